"""Synthetic precomputed features in training.caface.features' .npz layout: identities whose poor frames
are noisier, shorter and carry a style shift, so a fusion network has something to learn."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from training.caface.features import VARIANTS


def synthetic_features(path: Path, identities: int = 24, images: int = 6, dim: int = 128, style: int = 1472,
                       seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    labels = np.repeat(np.arange(identities), images)  # (N,)
    n, v = len(labels), len(VARIANTS)
    noise = np.array([0.3] + [1.2] * (v - 1))  # poor variants stray further from the identity
    norms = np.array([45.0] + [41.0] * (v - 1))
    direction = centres[labels][:, None] + noise[None, :, None] * rng.normal(size=(n, v, dim)) / np.sqrt(dim) * 3
    direction /= np.linalg.norm(direction, axis=2, keepdims=True)
    embedding = (direction * norms[None, :, None]).astype(np.float32)  # (N, V, D)
    styles = rng.normal(size=(n, v, style)) + np.arange(v)[None, :, None] * 0.5  # (N, V, S)
    names = np.array([f"id{k:03d}" for k in range(identities)])
    np.savez(path, paths=np.array([f"{names[y]}/{i}.jpg" for i, y in enumerate(labels)]), identities=names,
             labels=labels, variants=np.array(VARIANTS), model=np.array("synthetic"), embedding=embedding,
             style=styles.astype(np.float32), strength=np.zeros((n, v), np.float32))
    return path
