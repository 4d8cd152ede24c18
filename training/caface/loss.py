"""The CAFace training loss (Kim et al. 2022, REFERENCE.md):

    L = (1/B) Σ_b (1 − cos(f_b, W_{y_b}))  +  (1/B) Σ_b (1 − cos(f_b^seq, f_b))

f_b the fused feature of set b (all frames at once), W_y the centre of class y, f_b^seq the fused
feature of the same set when its frames arrive in two chunks, in another order, whose memories
are added. Our class centres are fixed, not learned: W_y = normalise(Σ_i f̂_i) over the clean
training images of y (`class_centres`). With per-frame assignment (training.caface.model) the
second term is zero up to float rounding; it is kept as the paper has it, and logged.

Not in the paper: the per-frame quality r_i (training.caface.model.ClusterNetwork) learns, by squared
error on detached tokens (`frame_quality_loss`, added to L, leaving the fusion unchanged), the target
t_i = clip((cos(f̂_i, W_y^(−i)) − a)/(b − a), 0, 1), W_y^(−i) the person's centre without frame i's
image (`frame_quality_targets`).
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


def frame_quality_loss(quality: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """(1/N) Σ_i (r_i − t_i)²: the per-frame quality r (N,) towards its target t (N,) (`frame_quality_targets`)."""
    return ((quality - target) ** 2).mean()


def caface_loss(fused, sequential, centres, frame_quality=None, frame_target=None) -> tuple[torch.Tensor, dict[str, float]]:
    """The paper's two terms, plus `frame_quality_loss` when given; the total and each term (for logging)."""
    centre, seq = centre_loss(fused, centres), sequential_loss(sequential, fused)
    terms = {"centre": centre.item(), "sequential": seq.item()}
    total = centre + seq
    if frame_quality is not None:
        q = frame_quality_loss(frame_quality, frame_target)
        terms["frame_quality"] = q.item()
        total = total + q
    return total, terms


def frame_quality_targets(embeddings: np.ndarray, labels: np.ndarray, num_classes: int,
                          low: float, high: float) -> np.ndarray:
    """t (N, V) float32: clip((cos(f̂_{i,v}, W_y^(−i)) − low)/(high − low), 0, 1) for embeddings (N, V, D).

    W_y^(−i) = normalise(Σ_{j ≠ i, y_j = y} f̂_{j,clean}): the person's centre without image i, so a
    frame is scored by how well it matches the person's other photos (NaN-free: an identity with one
    image gets target 0, and the sampler never draws it).
    """
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=2, keepdims=True), 1e-12)  # (N, V, D)
    sums = np.zeros((num_classes, embeddings.shape[2]))
    np.add.at(sums, labels, unit[:, 0])
    others = sums[labels] - unit[:, 0]  # (N, D)
    others /= np.maximum(np.linalg.norm(others, axis=1, keepdims=True), 1e-12)
    cos = np.einsum("nvd,nd->nv", unit, others)
    return np.clip((cos - low) / (high - low), 0.0, 1.0).astype(np.float32)


def class_centres(embeddings: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """W (C, D) float32: W_y = normalise(Σ_{i: y_i = y} f_i/‖f_i‖) over the given (clean) embeddings (N, D)."""
    unit = embeddings / np.maximum(np.linalg.norm(embeddings, axis=1, keepdims=True), 1e-12)
    sums = np.zeros((num_classes, embeddings.shape[1]))
    np.add.at(sums, labels, unit)
    return (sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)).astype(np.float32)
