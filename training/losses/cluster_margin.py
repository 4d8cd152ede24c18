"""Cluster-guided ArcFace margin with supervised contrastive clustering and cluster aligning.

OUR INTERPRETATION of Zhang, "Improved Face Representation via Joint Label Classification and
Supervised Contrastive Clustering" (arXiv 2312.04029). Only the paper's abstract is available: it names a
cluster-guided angular margin driven by a per-class hard level, a supervised contrastive
clustering term and a cluster aligning term. The equations below are our reading (the
project's REFERENCE.md), not the paper's; the paper's published figures say nothing about them.

Per class k we keep (buffers, full size on every rank):
    c_k          EMA of the normalised features of class k:  c_k ← α·c_k + (1 − α)·mean_{i: y_i=k} f̂_i,
                 initialised to that batch mean on the class's first appearance (α = 0.9).
                 c_k is not renormalised; ĉ_k = c_k/‖c_k‖ is used wherever a direction is needed.
    κ̄_k          EMA (β = 0.9) of the batch mean cosine of the class's samples to ĉ_k, measured
                 against the center *before* this step's update (what the loss saw). A class's
                 first appearance only initialises c_k: a cosine to a center built from the same
                 samples says nothing about how loosely the class clusters.

Hard level, min-max normalised over the classes measured so far (S):
    d_k = 1 − κ̄_k,   h_k = (d_k − min_S d)/(max_S d − min_S d),   h_k = 0.5 for k ∉ S or when
    max_S d − min_S d ≤ 1e-6 (all equal).

Loss over the global batch of N samples with the set U of distinct labels in it:
    m_k    = m0 + Δ·(h_k − 0.5)                                  (m0 0.5, Δ 0.1)
    L_arc  = CE with target logit s·cos(θ_y + m_y)               (ArcFace, per-class margin, s 64)
    L_scc  = −(1/N) Σ_i log( e^{f̂_i·ĉ_{y_i}/τ} / Σ_{u∈U} e^{f̂_i·ĉ_u/τ} )   (τ 0.1, centers detached)
    L_align = (1/|U|) Σ_{k∈U} (1 − cos(ĉ_k, W_k))                (gradient into W only)
    L = L_arc + λ_c·L_scc + λ_a·L_align                         (λ_c 1.0, λ_a 0.1)

Choices:
- The margins and the centers used by the loss come from the buffers as they were before this
  step; the buffers are updated after the loss, under no_grad, in training mode only.
- A class in the batch that has no center yet uses its batch mean (detached) as its center in
  L_scc and L_align, i.e. the value its center is about to be initialised to.
- Sharding: the buffers are full size (num_classes, D) and updated identically on every rank
  from the gathered batch (``ClassLogits.embeddings`` / ``global_labels``), so they stay in sync
  without communication. That costs num_classes·D floats per rank (4 GB for 2M classes at
  D 512); a sharded variant would keep rows [start, stop) and gather the batch's centers.
  L_scc is computed on gathered embeddings and wrapped in ``dist.replicated``; L_align is a
  per-shard partial sum over the classes whose weight this rank holds, divided by the global
  |U| and combined with ``dist.sum_shards``.
- L_align needs the head's weight rows: ``forward_batch`` passes ``weight_of(ids)``, reading
  ``head.weight[ids − head.start]`` (Partial FC holds classes [start, stop) in row order;
  a head without ``start`` holds all classes from 0).
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from training import dist
from training.heads.logits import ClassLogits
from training.losses import LOSSES
from training.losses.base import LossOutput, MarginSoftmaxLoss
from training.losses.combined_margin import combined_margin_target

WeightOf = Callable[[torch.Tensor], torch.Tensor]  # global class ids (n,) -> head weight rows (n, D)


def class_means(x: torch.Tensor, inverse: torch.Tensor, num: int) -> torch.Tensor:
    """Mean of the rows of x per group (inverse: (N,) group index in [0, num)). Shape (num, ...)."""
    sums = torch.zeros((num, *x.shape[1:]), dtype=x.dtype, device=x.device).index_add_(0, inverse, x)
    counts = torch.bincount(inverse, minlength=num).to(x.dtype)
    return sums / counts.view(-1, *([1] * (x.dim() - 1)))


def min_max_hardness(mean_cos: torch.Tensor, measured: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """h_k = min-max normalised (1 − κ̄_k) over the measured classes; 0.5 elsewhere or when all equal."""
    d = 1.0 - mean_cos
    lo = d.masked_fill(~measured, float("inf")).min()
    hi = d.masked_fill(~measured, float("-inf")).max()
    span = hi - lo  # −inf when nothing is measured yet
    h = (d - lo) / span.clamp(min=eps)
    return torch.where(measured & (span > eps), h, torch.full_like(d, 0.5))


def cluster_contrastive(f_hat: torch.Tensor, inverse: torch.Tensor, centers: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_scc: cross-entropy of f̂_i·ĉ_u/τ over the batch's classes u toward the sample's own class."""
    return F.cross_entropy(f_hat @ centers.T / temperature, inverse)  # logits (N, U)


@LOSSES.register("cluster_arcface")
class ClusterArcFaceLoss(MarginSoftmaxLoss):
    """ArcFace with per-class margins from cluster hardness, plus clustering and aligning terms."""

    centers: torch.Tensor
    center_seen: torch.Tensor
    mean_cos: torch.Tensor
    cos_seen: torch.Tensor

    def __init__(
        self,
        num_classes: int,
        embedding_size: int,
        scale: float = 64.0,
        margin: float = 0.5,
        margin_range: float = 0.1,
        center_momentum: float = 0.9,
        cos_momentum: float = 0.9,
        temperature: float = 0.1,
        cluster_weight: float = 1.0,
        align_weight: float = 0.1,
        easy_margin: bool = False,
    ) -> None:
        super().__init__(scale)
        self.margin, self.margin_range, self.easy_margin = margin, margin_range, easy_margin
        self.center_momentum, self.cos_momentum = center_momentum, cos_momentum
        self.temperature, self.cluster_weight, self.align_weight = temperature, cluster_weight, align_weight
        self.register_buffer("centers", torch.zeros(num_classes, embedding_size))
        self.register_buffer("center_seen", torch.zeros(num_classes, dtype=torch.bool))
        self.register_buffer("mean_cos", torch.zeros(num_classes))
        self.register_buffer("cos_seen", torch.zeros(num_classes, dtype=torch.bool))

    def hardness(self) -> torch.Tensor:
        return min_max_hardness(self.mean_cos, self.cos_seen)

    def class_margins(self) -> torch.Tensor:
        """m_k = m0 + Δ·(h_k − 0.5) for every class. Shape (num_classes,)."""
        return self.margin + self.margin_range * (self.hardness() - 0.5)

    def target_logit(self, cos_y: torch.Tensor, logits: ClassLogits) -> torch.Tensor:
        m2 = self.class_margins()[logits.global_labels].to(cos_y.dtype)  # (B,)
        return combined_margin_target(cos_y, 1.0, m2, 0.0, self.easy_margin)

    def batch_centers(self, f_hat: torch.Tensor, classes: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        """ĉ_u for the batch's classes: the stored center, or the batch mean where none exists yet. (U, D)."""
        fresh = class_means(f_hat.detach(), inverse, classes.numel())
        stored = self.centers[classes].to(fresh.dtype)
        return F.normalize(torch.where(self.center_seen[classes][:, None], stored, fresh), dim=1)

    def forward(self, logits: ClassLogits, weight_of: WeightOf | None = None) -> LossOutput:
        f_hat = F.normalize(logits.embeddings.float(), dim=1)  # (N, D)
        classes, inverse = torch.unique(logits.global_labels, return_inverse=True)  # (U,), (N,)
        centers = self.batch_centers(f_hat, classes, inverse)
        out = super().forward(logits)
        parts = dict(out.parts)
        scc = cluster_contrastive(f_hat, inverse, centers, self.temperature)
        parts["cluster"] = self.cluster_weight * dist.replicated(scc)
        if weight_of is not None:
            parts["align"] = self.align_weight * self.align_term(logits, classes, centers, weight_of)
        if self.training:
            self.update(f_hat.detach(), classes, inverse)
        return LossOutput(sum(parts.values()), out.logits, parts)

    def align_term(self, logits: ClassLogits, classes: torch.Tensor, centers: torch.Tensor, weight_of: WeightOf) -> torch.Tensor:
        """(1/|U|) Σ_k (1 − cos(ĉ_k, W_k)), each shard summing the batch classes it holds."""
        cols = torch.unique(logits.labels[logits.local_rows])  # columns of this shard's batch classes
        ids = logits.class_ids[cols]
        cos = F.cosine_similarity(centers[torch.searchsorted(classes, ids)], weight_of(ids).float(), dim=1)
        return dist.sum_shards((1.0 - cos).sum() / classes.numel())

    @torch.no_grad()
    def update(self, f_hat: torch.Tensor, classes: torch.Tensor, inverse: torch.Tensor) -> None:
        """EMA of the centers and of the mean cosine to them, from this step's (gathered) batch."""
        num = classes.numel()
        had_center = self.center_seen[classes]
        old = F.normalize(self.centers[classes], dim=1)  # (U, D); zero rows where no center yet
        kappa = class_means((f_hat * old[inverse]).sum(dim=1), inverse, num)  # (U,)
        prev = self.mean_cos[classes]
        ema = torch.where(self.cos_seen[classes], self.cos_momentum * prev + (1 - self.cos_momentum) * kappa, kappa)
        self.mean_cos[classes] = torch.where(had_center, ema, prev)
        self.cos_seen[classes] |= had_center
        means = class_means(f_hat, inverse, num)
        blended = self.center_momentum * self.centers[classes] + (1 - self.center_momentum) * means
        self.centers[classes] = torch.where(had_center[:, None], blended, means)
        self.center_seen[classes] = True

    def forward_batch(self, model: nn.Module, head: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        logits = head(model(images), labels)
        start = getattr(head, "start", 0)
        return self(logits, weight_of=lambda ids: head.weight[ids - start])
