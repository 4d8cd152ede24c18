"""Evaluate a torch backbone on an LFW-style pairs benchmark (training-time and `faceset eval --torch`)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from training.checkpoint import atomic_write_text, load_state
from training.config import EvalConfig
from training.data.transforms import Preprocess
from training.eval.pairs import evaluate_pairs, read_pairs


@torch.no_grad()
def embed_paths(model: nn.Module, paths: Sequence[Path], preprocess: Preprocess, device: torch.device, batch_size: int = 64, flip: bool = False) -> np.ndarray:
    """Raw (unnormalised) embeddings of image files, (N, D); with `flip`, the sum over the mirrored image too."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([preprocess(p) for p in paths[i : i + batch_size]]).to(device)  # (B, 3, H, W)
        e = model(x).float()
        if flip:
            e = e + model(torch.flip(x, dims=[3])).float()
        out.append(e.cpu().numpy())
    model.train(was_training)
    return np.concatenate(out, 0)


@dataclass
class PairEmbeddings:
    a: np.ndarray  # (N, D) raw embeddings of each pair's first image (norm = MagFace magnitude)
    b: np.ndarray  # (N, D) second image
    issame: np.ndarray  # (N,) bool


def embed_pairs(model: nn.Module, pairs_file: Path, images_dir: Path, preprocess: Preprocess, device: torch.device, flip: bool = False) -> PairEmbeddings:
    """Embed every image of a pairs file once, and return both sides of every pair."""
    pairs = read_pairs(pairs_file, images_dir)
    unique = sorted({p for pair in pairs for p in (pair.path_a, pair.path_b)})
    index = {p: i for i, p in enumerate(unique)}
    emb = embed_paths(model, unique, preprocess, device, flip=flip)
    a = emb[[index[p.path_a] for p in pairs]]
    b = emb[[index[p.path_b] for p in pairs]]
    return PairEmbeddings(a, b, np.array([p.issame for p in pairs]))


@torch.no_grad()
def embed_bin(model: nn.Module, bin_path: Path, device: torch.device, size: int = 112, flip: bool = False, batch_size: int = 64) -> PairEmbeddings:
    """Both sides of every pair of an insightface `.bin` verification set (lfw.bin, cfp_fp.bin, agedb_30.bin, ...)."""
    from training.data.transforms import to_tensor
    from training.data.verification import load_verification_bin

    vs = load_verification_bin(bin_path, size=size)
    model.eval()
    out = []
    for i in range(0, len(vs.images), batch_size):
        x = torch.stack([to_tensor(img) for img in vs.images[i : i + batch_size]]).to(device)  # (B, 3, H, W)
        e = model(x).float()
        if flip:
            e = e + model(torch.flip(x, dims=[3])).float()
        out.append(e.cpu().numpy())
    emb = np.concatenate(out, 0)  # (2P, D): pairs are consecutive rows
    return PairEmbeddings(emb[0::2], emb[1::2], np.asarray(vs.issame, dtype=bool))


def pair_summary(pe: PairEmbeddings, n_folds: int = 10) -> dict:
    s = evaluate_pairs(pe.a, pe.b, pe.issame, n_folds=n_folds).summary()
    return {"accuracy": s["accuracy_mean"], "accuracy_std": s["accuracy_std"], "best_threshold": s["best_threshold"], "pairs": int(pe.issame.size)}


def pair_evaluator(cfg: EvalConfig, size: int, settings, device: torch.device) -> Callable[[nn.Module], dict] | None:
    """The epoch-end evaluation the config asks for, or None."""
    if not cfg.pairs:
        return None
    pairs_file = settings.data_dir / cfg.pairs  # an absolute cfg.pairs wins over the base
    images = settings.base_dir(cfg.images_base) / (cfg.images or "")
    preprocess = Preprocess(size=size, crop=tuple(cfg.crop) if cfg.crop else None)

    def run(model: nn.Module) -> dict:
        return pair_summary(embed_pairs(model, pairs_file, images, preprocess, device), cfg.n_folds)

    return run


# ---- `faceset eval` for torch checkpoints ---------------------------------------------------

def load_backbone(spec: str, device: torch.device) -> tuple[nn.Module, int]:
    """A trained backbone (a backbone.pt, or a checkpoint directory runs/<name>/step-N) or
    `untrained:<arch>[:<embedding_size>]` (seed 0).

    Returns (model in eval mode, its input size).
    """
    from training.models import build_backbone

    if spec.startswith("untrained:"):
        _, arch, *size = spec.split(":")
        with torch.random.fork_rng(devices=[]):  # seed 0 for the initialisation, the caller's RNG left as it was
            torch.manual_seed(0)
            model = build_backbone(arch, embedding_size=int(size[0]) if size else 512)
        return model.to(device).eval(), getattr(model, "input_size", 112)
    if Path(spec).is_dir():  # a training checkpoint directory (runs/<name>/step-N)
        return _from_checkpoint_dir(Path(spec), device)
    art = load_state(spec)
    model = build_backbone(art["arch"], embedding_size=art["embedding_size"], **art.get("kwargs", {}))
    model.load_state_dict(art["backbone"] if "backbone" in art else art["state_dict"])  # ours, or a converter's
    size = art.get("input_size", getattr(model, "input_size", 112))
    return model.to(device).eval(), int(size[0] if isinstance(size, (list, tuple)) else size)


def _from_checkpoint_dir(path: Path, device: torch.device) -> tuple[nn.Module, int]:
    from training.models import build_backbone

    state = load_state(path / "model.pt")
    m = state["config"]["model"]
    model = build_backbone(m["backbone"], embedding_size=m["embedding_size"], **m.get("kwargs", {}))
    model.load_state_dict(state["backbone"])
    return model.to(device).eval(), state["config"]["data"]["size"]


@torch.no_grad()
def magnitude_by_degradation(model: nn.Module, paths: Sequence[Path], preprocess: Preprocess, device: torch.device, levels: dict[str, Sequence[float]]) -> dict[str, list[tuple[float, float]]]:
    """Mean embedding magnitude of the images at each strength of each degradation, [(strength, mean ‖f‖)]."""
    from PIL import Image

    from training.data.transforms import crop_resize, load_rgb, to_tensor
    from training.eval.degrade import degrade

    images = [np.asarray(load_rgb(p)) for p in paths]
    out: dict[str, list[tuple[float, float]]] = {}
    for kind, strengths in levels.items():
        rows = []
        for s in strengths:
            batch = [degrade(img, kind, s, seed=i) if s else img for i, img in enumerate(images)]
            x = torch.stack([to_tensor(crop_resize(Image.fromarray(b), preprocess.size, preprocess.crop)) for b in batch]).to(device)
            mags = torch.cat([model(x[i : i + 64]).float().norm(dim=1) for i in range(0, len(x), 64)])
            rows.append((float(s), float(mags.mean())))
        out[kind] = rows
    return out


DEGRADATION_SAMPLE = 200  # images (an even stride over the pairs' images) for the magnitude study
DEFAULT_DEGRADATIONS = {"blur": (0, 1, 2, 4), "lowres": (1, 2, 4, 8), "occlude": (0, 0.1, 0.25, 0.4), "noise": (0, 10, 25, 50)}


def evaluate_checkpoint(spec: str, pairs: Path, images: Path, crop: tuple | None, out_dir: Path | None, device: torch.device, flip: bool = False, degradations: bool = True) -> dict:
    """Pair accuracy, TAR@FAR, the MagFace error-versus-reject curve and magnitude vs degradation."""
    from training.eval.plots import plot_erc, plot_roc
    from training.eval.quality import erc_from_embeddings

    model, size = load_backbone(spec, device)
    preprocess = Preprocess(size=size, crop=crop)
    is_bin = pairs.suffix == ".bin"  # an insightface verification set holds its own images
    pe = embed_bin(model, pairs, device, size, flip) if is_bin else embed_pairs(model, pairs, images, preprocess, device, flip=flip)
    result: dict = {"model": spec, **pair_summary(pe)}
    s = evaluate_pairs(pe.a, pe.b, pe.issame).summary()
    result["tar_at_far"] = s["tar_at_far"]
    for fmr in (1e-3, 1e-2):
        erc = erc_from_embeddings(pe.a, pe.b, pe.issame, fmr=fmr)
        result[f"erc_fmr_{fmr:g}"] = {"reject": erc.reject.tolist(), "fnmr": erc.fnmr.tolist(), "auc": erc.auc}
    if degradations and not is_bin:
        unique = sorted({p for p in read_pairs(pairs, images) for p in (p.path_a, p.path_b)})
        sample = unique[:: max(1, len(unique) // DEGRADATION_SAMPLE)][:DEGRADATION_SAMPLE]
        result["magnitude_by_degradation"] = magnitude_by_degradation(model, sample, preprocess, device, DEFAULT_DEGRADATIONS)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        report = evaluate_pairs(pe.a, pe.b, pe.issame)
        plot_roc({spec: (report.roc[0], report.roc[1])}, out_dir / "roc.png")
        plot_erc({f"FMR {k.split('_')[-1]}": (v["reject"], v["fnmr"]) for k, v in result.items() if k.startswith("erc_")}, out_dir / "erc.png", title="Error versus reject (quality = MagFace magnitude)")
        atomic_write_text(out_dir / "eval.json", json.dumps(result, indent=1))
    return result
