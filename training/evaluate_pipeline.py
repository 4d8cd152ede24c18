"""Verification through the whole serving pipeline: raw photo -> detect -> align -> engine -> cosine.

Torch-free (engines + numpy); `faceset eval CARD` runs it. A photo in which the detector finds no
face gets no embedding: its pairs score −1 (a non-match) and are counted, never silently embedded
from an arbitrary crop.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from engines.base import build_engine
from engines.detection import build_detector
from engines.model_card import Accuracy, ModelCard, atomic_write_bytes
from engines.pipeline import FacePipeline
from training.eval.pairs import Pair, kfold_accuracy, read_pairs, tar_at_far
from training.eval.quality import error_versus_reject, pair_quality


@dataclass
class PipelinePairs:
    scores: np.ndarray  # (N,) cosine; −1 where a side has no face
    issame: np.ndarray  # (N,) bool
    quality: np.ndarray  # (N,) min magnitude of the two sides (0 where no face)
    missing: list[str]  # photos without a detected face


def load_pipeline(card_path: Path, runtime: str = "onnxruntime", threads: int = 0) -> FacePipeline:
    card = ModelCard.load(card_path)
    engine = build_engine(runtime, card=card, intra_op_threads=threads)
    return FacePipeline(build_detector("mtcnn"), engine, card)


def score_pairs(pipeline: FacePipeline, pairs_file: Path, images_dir: Path, batch: int = 32) -> PipelinePairs:
    return score_pair_list(pipeline, read_pairs(pairs_file, images_dir), batch)


def score_pair_list(pipeline: FacePipeline, pairs: list[Pair], batch: int = 32) -> PipelinePairs:
    """Cosine scores of pairs of photos (training.eval.pairs.Pair), each photo detected and embedded once."""
    unique = sorted({p for pair in pairs for p in (pair.path_a, pair.path_b)})
    emb: dict[Path, np.ndarray] = {}
    for i in range(0, len(unique), batch):
        paths = unique[i : i + batch]
        photos = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
        detections = [pipeline.detect(img, max_faces=1) for img in photos]
        crops = [pipeline.align(img, d) for img, d in zip(photos, detections)]
        raw = pipeline.embed_crops(np.concatenate(crops))
        j = 0
        for path, d in zip(paths, detections):
            if d:
                emb[path] = raw[j]
                j += 1
    missing = [str(p) for p in unique if p not in emb]
    scores, quality = [], []
    for pair in pairs:
        a, b = emb.get(pair.path_a), emb.get(pair.path_b)
        if a is None or b is None:
            scores.append(-1.0)
            quality.append(0.0)
            continue
        na, nb = np.linalg.norm(a), np.linalg.norm(b)
        scores.append(float(a @ b / (na * nb)))
        quality.append(float(pair_quality(na, nb)))
    return PipelinePairs(np.asarray(scores), np.array([p.issame for p in pairs]), np.asarray(quality), missing)


def summarise(pp: PipelinePairs, n_folds: int = 10) -> dict:
    k = kfold_accuracy(pp.scores, pp.issame, n_folds=n_folds)
    erc = error_versus_reject(pp.scores, pp.issame, pp.quality, fmr=1e-3)
    erc2 = error_versus_reject(pp.scores, pp.issame, pp.quality, fmr=1e-2)
    tar = tar_at_far(pp.scores, pp.issame)
    return {
        "accuracy": float(k.mean),
        "accuracy_std": float(k.std),
        "pairs": int(pp.issame.size),
        "photos_without_face": len(pp.missing),
        "tar_at_far": tar.as_dict(),
        "erc_fnmr_at_fmr_1e-3": dict(zip([f"{r:.2f}" for r in erc.reject], erc.fnmr.tolist())),
        "erc_fnmr_at_fmr_1e-2": dict(zip([f"{r:.2f}" for r in erc2.reject], erc2.fnmr.tolist())),
    }


def _erc(pp: PipelinePairs, fmr: float) -> tuple[np.ndarray, np.ndarray]:
    erc = error_versus_reject(pp.scores, pp.issame, pp.quality, fmr=fmr)
    return erc.reject, erc.fnmr


def record_accuracy(card_path: Path, result: dict, benchmark: str) -> None:
    """Write the measured accuracy into the card (replacing an earlier figure for the same benchmark)."""
    card = ModelCard.load(card_path)
    entry = Accuracy(
        benchmark=benchmark,
        value=round(100 * result["accuracy"], 2),
        std=round(100 * result["accuracy_std"], 2),
        protocol="raw photos through faceset's pipeline (MTCNN, 5-point similarity alignment to the card's template, "
        "this ONNX, flip TTA as the card says), cosine; 10 folds, threshold chosen on the other 9",
    )
    card.accuracy = [a for a in card.accuracy if a.benchmark != benchmark] + [entry]
    card.save(card_path)


def main(card: Path, pairs: Path, images: Path, out: Path | None = None, record: bool = False) -> dict:
    pp = score_pairs(load_pipeline(card), pairs, images)
    result = {"model": str(card), **summarise(pp)}
    if record:
        record_accuracy(card, result, f"LFW View 2 fold from {pairs.parent.name} ({result['pairs']} pairs)")
    if out is not None:
        from training.eval.plots import plot_erc

        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / "pipeline_eval.json", json.dumps(result, indent=1).encode())
        curves = {f"FMR {fmr:g}": _erc(pp, fmr) for fmr in (1e-3, 1e-2)}
        plot_erc(curves, out / "erc.png", title=f"{card.parent.name}: error versus reject (quality = magnitude), LFW dev")
    return result
