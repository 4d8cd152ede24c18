"""Export a trained CAFace fusion network as the two ONNX graphs and the fusion card `engines.fusion` loads.

    faceset caface export runs/celeba-caface/caface.pt --out models/caface \\
        [--name faceset-caface --version 1] [--parity-features runs/caface/features/celeba-holdout.npz]

assign.onnx     raw_embedding (N, D), style (N, S) -> assignment (N, M), unit_embedding (N, D), stored_style (N, K)
aggregate.onnx  sums (M, D), style_sums (M, K), counts (M,) -> embedding (D,), weights (M, D), quality ()

Parity: ONNX Runtime vs torch on frames (real precomputed features when given, else random
vectors scaled like embeddings) and on memories of random sets of those frames: the per-frame
outputs must agree within PARITY_MAX_ABS (stored style relative to its scale), the fused
embeddings with cosine ≥ PARITY_MIN_COSINE, the qualities within PARITY_MAX_ABS. Graphs are
written to temp files and moved into place only after parity holds; the card (sha256 of both) last.
The tracing, the staging and ParityError are training.export's, as for the backbone.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from engines.atomic import sha256_file
from engines.fusion import (
    AGGREGATE_INPUTS,
    AGGREGATE_OUTPUTS,
    ASSIGN_INPUTS,
    ASSIGN_OUTPUTS,
    FusionCard,
    FusionModel,
    FusionParity,
)
from engines.model_card import ModelCard
from training.caface.model import CAFace, FusionArch
from training.checkpoint import load_state
from training.export import OPSET, ParityError, deep_merge, export_traced, staged_files

PARITY_MAX_ABS = 1e-4
PARITY_MIN_COSINE = 0.99999
PARITY_FRAMES = 256
PARITY_SETS = 64
LICENCE = ("CelebA: non-commercial research only (trained on features of CelebA images, from a recognition model "
           "fine-tuned on CelebA)")


class AssignGraph(nn.Module):
    def __init__(self, model: CAFace) -> None:
        super().__init__()
        self.model = model

    def forward(self, raw: torch.Tensor, style: torch.Tensor):
        return self.model.assign(raw, style)


class AggregateGraph(nn.Module):
    """One template's memory (no batch axis) through the AGN."""

    def __init__(self, model: CAFace) -> None:
        super().__init__()
        self.model = model

    def forward(self, sums: torch.Tensor, style_sums: torch.Tensor, counts: torch.Tensor):
        fused, weights, quality = self.model.aggregate(sums[None], style_sums[None], counts[None])  # batch of 1
        return fused[0], weights[0], quality[0]  # (D,), (M, D), ()


def load_fusion(path: str | Path) -> tuple[CAFace, dict]:
    ck = load_state(path)
    low, high = ck["quality_range"]
    model = CAFace(FusionArch(**ck["arch"]), low, high)
    model.load_state_dict(ck["state_dict"], strict=True)
    return model.float().eval(), ck


def parity_frames(arch: FusionArch, features: Path | None, count: int = PARITY_FRAMES) -> tuple[np.ndarray, np.ndarray, str]:
    """(raw (n, D), style (n, S), description): real frames of every variant when a features file is given."""
    if features is not None:
        d = np.load(features)
        emb, style = d["embedding"], d["style"]  # (N, V, D), (N, V, S)
        count = min(count, emb.shape[0] * emb.shape[1])  # a small training set (faceset model fuse) has fewer
        rows = np.random.default_rng(0).choice(emb.shape[0] * emb.shape[1], size=count, replace=False)
        return (emb.reshape(-1, emb.shape[-1])[rows], style.reshape(-1, style.shape[-1])[rows],
                f"{count} real frames (clean and degraded) from {features.name}")
    rng = np.random.default_rng(0)
    raw = rng.normal(size=(count, arch.embedding_size)).astype(np.float32) * 4.0
    return raw, rng.normal(size=(count, arch.style_size)).astype(np.float32), f"{count} random frames"


def check_parity(model: CAFace, fusion: FusionModel, raw: np.ndarray, style: np.ndarray, inputs: str) -> FusionParity:
    with torch.no_grad():
        a, unit, stored = (t.numpy() for t in model.assign(torch.from_numpy(raw), torch.from_numpy(style)))
    got = fusion.assign(raw, style)
    scale = np.maximum(np.abs(stored), 1.0)
    assign_diff = max(float(np.abs(a - got.assignment).max()), float(np.abs(unit - got.unit_embedding).max()),
                      float((np.abs(stored - got.style) / scale).max()))
    rng = np.random.default_rng(1)
    cosines, quality_diff = [], 0.0
    for _ in range(PARITY_SETS):
        pick = rng.choice(len(raw), size=int(rng.integers(1, 17)), replace=False)
        delta = fusion.memory_delta(got._replace(assignment=got.assignment[pick], unit_embedding=got.unit_embedding[pick],
                                                 style=got.style[pick]))
        ort_out = fusion.aggregate(*delta)
        with torch.no_grad():
            t_emb, _, t_q = model.aggregate(*(torch.from_numpy(x[None]).float() for x in delta))
        cosines.append(float(np.dot(t_emb[0].numpy(), ort_out.embedding)))
        quality_diff = max(quality_diff, abs(float(t_q[0]) - ort_out.quality))
    parity = FusionParity(reference=f"torch {torch.__version__} fp32", runtime=f"onnxruntime {ort.__version__} CPU",
                          inputs=f"{inputs}; {PARITY_SETS} memories of random sets of 1-16 of them",
                          assign_max_abs_diff=assign_diff, aggregate_min_cosine=min(cosines),
                          quality_max_abs_diff=quality_diff)
    if not (assign_diff <= PARITY_MAX_ABS and parity.aggregate_min_cosine >= PARITY_MIN_COSINE
            and quality_diff <= PARITY_MAX_ABS):
        raise ParityError(f"fusion graphs differ from torch: {parity}")
    return parity


def card_data(ck: dict, recognition: ModelCard, name: str, version: str, command: str | None, source: Path) -> dict:
    arch, cfg = ck["arch"], ck["config"]
    low, high = ck["quality_range"]
    return {
        "name": name, "version": str(version),
        "files": {"assign": {"path": "assign.onnx", "sha256": "0" * 64},
                  "aggregate": {"path": "aggregate.onnx", "sha256": "0" * 64}},
        "clusters": arch["clusters"], "embedding_size": arch["embedding_size"], "style_size": arch["style_size"],
        "stored_style_size": arch["stored_style"] + 2, "frame_quality_index": arch["stored_style"],
        "magnitude_index": arch["stored_style"] + 1,
        "recognition": {"name": recognition.name, "version": recognition.version,
                        "onnx_sha256": recognition.files.onnx.sha256,
                        "style_channels": list(recognition.outputs.style_channels or []),
                        "tta": ("flip TTA as the recognition card says: raw embedding f(x) + f(mirror x), style "
                                "(σ(x) + σ(mirror x))/2 (engines.base.merge_tta)"
                                if recognition.flip_tta else "no TTA")},
        "quality": {"low": low, "high": high, "evidence_frames": arch["evidence_frames"],
                    "frame_quality_range": list(arch["frame_quality_range"])},
        "training": {
            "data": (f"features of the default model's CelebA training split (aligned by our MTCNN to dlib_150), "
                     f"{ck['training_identities']} identities, every {cfg['features']['eval_every']}-th multi-image "
                     f"CelebA-299 identity kept out for evaluation; each image clean and as 4 poor frames (blur, "
                     f"low resolution, occlusion, noise); the calibration hold-out never used"),
            "licence": "CelebA: non-commercial research only",
            "recipe": f"training/recipes/caface.sh (faceset caface train {cfg['name']})",
            "notes": (f"{ck['step']} steps of {cfg['batch_sets']} sets of {cfg['sets']['min_size']}-"
                      f"{cfg['sets']['max_size']} frames; loss mean(1 - cos(f, W_y)) + (1 - cos(f_seq, f)), W_y fixed "
                      f"class centres from clean crops; the frame quality r_i learns its target by squared error (detached); "
                      f"AdamW lr {cfg['optim']['lr']}, wd {cfg['optim']['weight_decay']}"),
        },
        "licence": LICENCE,
        "provenance": {"source": f"{source.name}: faceset CAFace fusion network (training.caface.train)",
                       "source_sha256": sha256_file(source),
                       "exporter": f"torch {torch.__version__} (TorchScript exporter), opset {OPSET}, onnx {onnx.__version__}",
                       "command": command,
                       "notes": "per-frame assignment (no cross-frame attention): see training/caface/model.py"},
    }


def export_fusion(checkpoint: str | Path, out_dir: str | Path, recognition_card: str | Path, name: str = "faceset-caface",
                  version: str = "1", parity_features: Path | None = None, command: str | None = None,
                  card_overrides: dict | None = None) -> FusionCard:
    """caface.pt -> out_dir/{assign,aggregate}.onnx + card.yaml after parity; returns the card.

    card_overrides: nested card fields replacing card_data's (training, licence … of a fusion trained on other data)."""
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    model, ck = load_fusion(checkpoint)
    recognition = ModelCard.load(recognition_card)
    if recognition.files.onnx.sha256 != ck["recognition"]["sha256"]:
        raise ValueError(f"{checkpoint} was trained on {ck['recognition']}, not on {recognition.name} "
                         f"{recognition.version} ({recognition.files.onnx.sha256})")
    data = deep_merge(card_data(ck, recognition, name, version, command, checkpoint), card_overrides or {})
    arch = model.arch
    graphs = ("assign", "aggregate")
    with staged_files(out_dir, [f"{key}.onnx" for key in graphs]) as tmps:
        m, d, k = arch.clusters, arch.embedding_size, arch.stored_style + 2
        export_traced(AssignGraph(model), (torch.randn(3, d), torch.randn(3, arch.style_size)), tmps[0],
                      ASSIGN_INPUTS, ASSIGN_OUTPUTS, {n: {0: "frames"} for n in (*ASSIGN_INPUTS, *ASSIGN_OUTPUTS)})
        export_traced(AggregateGraph(model), (torch.rand(m, d), torch.rand(m, k), torch.rand(m) + 1), tmps[1],
                      AGGREGATE_INPUTS, AGGREGATE_OUTPUTS, {})
        for key, tmp in zip(graphs, tmps):
            data["files"][key] = {"path": tmp.name, "sha256": sha256_file(tmp)}
        card = FusionCard.model_validate(data)
        raw, style, inputs = parity_frames(arch, parity_features)
        card.parity = check_parity(model, FusionModel(card, out_dir), raw, style, inputs)
    for key in graphs:
        getattr(card.files, key).path = f"{key}.onnx"
    card.save(out_dir)
    return card
