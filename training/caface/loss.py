"""The CAFace training loss (Kim et al. 2022, REFERENCE.md):

    L = (1/B) Σ_b (1 − cos(f_b, W_{y_b}))  +  (1/B) Σ_b (1 − cos(f_b^seq, f_b))

f_b the fused feature of set b (all frames at once), W_y the centre of class y, f_b^seq the fused
feature of the same set when its frames arrive in two chunks, in another order, whose memories
are added. Our class centres are fixed, not learned: W_y = normalise(Σ_i f̂_i) over the clean
training images of y (`class_centres`). With per-frame assignment (training.caface.model) the
second term is zero up to float rounding; it is kept as the paper has it, and logged.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def centre_loss(fused: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_b (1 − cos(f_b, W_{y_b})); fused (B, D), centres (B, D) (the row of each set's class)."""
    return (1.0 - F.cosine_similarity(fused, centres, dim=1)).mean()


def sequential_loss(sequential: torch.Tensor, all_at_once: torch.Tensor) -> torch.Tensor:
    """(1/B) Σ_b (1 − cos(f_b^seq, f_b)); both (B, D)."""
    return (1.0 - F.cosine_similarity(sequential, all_at_once, dim=1)).mean()


def caface_loss(fused, sequential, centres) -> tuple[torch.Tensor, dict[str, float]]:
    """The total loss and its two terms (for logging)."""
    centre, seq = centre_loss(fused, centres), sequential_loss(sequential, fused)
    return centre + seq, {"centre": centre.item(), "sequential": seq.item()}


def class_centres(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """W (C, D) float32: W_y = normalise(Σ_{i: y_i = y} f_i/‖f_i‖) over the given (clean) embeddings (N, D)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sums = np.zeros((num_classes, embeddings.shape[1]))
    np.add.at(sums, labels, unit)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
