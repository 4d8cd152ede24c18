"""Precompute the fusion network's inputs: per aligned image and degradation, raw embedding and style statistics.

    faceset caface features runs/aligned/celeba-dlib150 runs/caface/features/celeba-train.npz \\
        [--card models/default] [--chunk 256]

For every image of a folder-per-identity tree (symlinks followed) and every variant in VARIANTS
(the clean crop, then one poor frame per degradation of `training.eval.degrade`, its strength drawn
uniformly from POOR_STRENGTHS with a seed fixed by the image's path and the degradation), the
recognition model runs on ONNX Runtime (its "embedding" and "style" outputs) with the card's flip
TTA:

    embedding = f(x) + f(mirror(x))             (N, V, D)  the card's raw embedding; ‖·‖ is its magnitude
    style     = (σ(x) + σ(mirror(x))) / 2       (N, V, 2·Σ C_i)

The style of a TTA embedding is the mean of the two views' statistics: the embedding is made of
both views, so its style input describes both, and it stays symmetric (mirroring the face gives
the same frame). The service computes it the same way: `engines.base.merge_tta` is the one implementation.

Resumable: each chunk of images is written atomically to OUT's folder as part-XXXXX.npz and skipped
when present; the parts are merged into OUT at the end. Numpy + ONNX Runtime only (no torch).
"""
from __future__ import annotations

import hashlib
import io
import logging
import time
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np

from engines.atomic import atomic_write
from engines.base import run_aligned
from engines.model_card import ModelCard
from engines.onnx_runtime import OnnxRuntimeEngine
from training.eval.degrade import degrade

log = logging.getLogger(__name__)

VARIANTS: tuple[str, ...] = ("clean", "blur", "lowres", "occlude", "noise")
# Poor frames: well past where the magnitude starts to fall (training.evaluate.DEFAULT_DEGRADATIONS)
POOR_STRENGTHS: dict[str, tuple[float, float]] = {
    "blur": (2.0, 5.0),        # Gaussian σ, pixels of a 150 px crop
    "lowres": (4.0, 10.0),     # a face 4-10× smaller (≈ 15-38 px wide)
    "occlude": (0.2, 0.45),    # fraction of the crop covered by a grey square
    "noise": (20.0, 50.0),     # σ, grey levels
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")


def list_tree(root: Path) -> tuple[list[str], list[str]]:
    """(relative image paths 'identity/file', sorted; identity names, sorted) of a folder-per-identity tree."""
    paths = sorted(f"{d.name}/{p.name}" for d in root.iterdir() if d.is_dir()
                   for p in d.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    return paths, sorted({p.split("/")[0] for p in paths})


def variant_seed(rel: str, kind: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{rel}|{kind}".encode()).digest()[:4], "little")


def make_variants(face: np.ndarray, rel: str) -> tuple[np.ndarray, np.ndarray]:
    """The clean crop and one poor frame per degradation: (V, S, S, 3) uint8 and their strengths (V,)."""
    frames, strengths = [face], [0.0]
    for kind in VARIANTS[1:]:
        seed = variant_seed(rel, kind)
        low, high = POOR_STRENGTHS[kind]
        strength = float(np.random.default_rng(seed).uniform(low, high))
        frames.append(degrade(face, kind, strength, seed=seed))
        strengths.append(strength)
    return np.stack(frames), np.array(strengths, np.float32)


def read_crop(path: Path, size: int) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None or bgr.shape[:2] != (size, size):
        raise ValueError(f"{path}: not a readable {size}×{size} aligned crop")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def compute_chunk(engine: OnnxRuntimeEngine, card: ModelCard, root: Path, rels: Sequence[str]) -> dict:
    faces, strengths = zip(*(make_variants(read_crop(root / rel, card.input.size), rel) for rel in rels))
    frames = np.concatenate(faces)  # (n·V, S, S, 3), image-major
    out = run_aligned(engine, card, frames)  # {"embedding": (n·V, D), "style": (n·V, S)}
    n, v = len(rels), len(VARIANTS)
    return {"embedding": out["embedding"].reshape(n, v, -1), "style": out["style"].reshape(n, v, -1).astype(np.float32),
            "strength": np.stack(strengths)}


def _save_npz(path: Path, arrays: dict) -> None:
    def write(f):
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        f.write(buffer.getvalue())
    atomic_write(path, write)


def precompute(root: Path, out: Path, card_path: Path, chunk: int = 256, threads: int = 1) -> Path:
    """Features of every image of `root` into `out` (.npz); resumable by chunk."""
    card = ModelCard.load(card_path)
    engine = OnnxRuntimeEngine(card, providers=["CPUExecutionProvider"], intra_op_threads=threads, max_batch_size=64)
    rels, identities = list_tree(root)
    parts_dir = out.with_suffix(".parts")
    parts_dir.mkdir(parents=True, exist_ok=True)
    parts = []
    for k, start in enumerate(range(0, len(rels), chunk)):
        part = parts_dir / f"part-{k:05d}.npz"
        parts.append(part)
        if part.exists():
            continue
        t = time.time()
        _save_npz(part, compute_chunk(engine, card, root, rels[start : start + chunk]))
        log.info("%s: %d / %d images (%.1f images/s)", root.name, min(start + chunk, len(rels)), len(rels),
                 min(chunk, len(rels) - start) / (time.time() - t))
    loaded = [np.load(p) for p in parts]
    index = {name: i for i, name in enumerate(identities)}
    _save_npz(out, {
        "paths": np.array(rels), "identities": np.array(identities),
        "labels": np.array([index[r.split("/")[0]] for r in rels], np.int64),
        "variants": np.array(VARIANTS), "model": np.array(f"{card.name} {card.version} {card.files.onnx.sha256}"),
        **{key: np.concatenate([p[key] for p in loaded]) for key in ("embedding", "style", "strength")},
    })
    return out
