"""GB-CosFace: a CosFace-like loss judged against a per-sample and a global boundary.

Chen et al., "GB-CosFace: Rethinking Softmax-based Face Recognition from the Perspective of Open
Set Classification" (ACCV 2022, arXiv 2111.11186). Per sample i of the global batch:

    cos_p = cos θ_y
    cos_n = (1/s)·log Σ_{j≠y} exp(s·cos θ_j)                  (soft maximum over the negatives)
    v_i   = (cos_p + cos_n)/2                                  (no gradient)
    v̂_i   = v_i + α·(V − v_i)
    L     = (1/2N)·Σ_i [ −log σ(2s(cos_p − m − v̂_i)) − log σ(2s(v̂_i − m − cos_n)) ]

The global boundary V is a buffer: on the first training batch it is set to mean_i v_i; every
step it is clamped to [min_boundary, max_boundary], used, then V ← (1−r)·V_clamped + r·mean_i v_i.
Defaults s 32, m 0.16, α 0.15, r 0.01, bounds [0.5, 0.7].

With α = 0 both terms equal −log σ(s(cos_p − cos_n) − 2sm) = softmax CE with target logit
s·(cos_p − 2m): CosFace with margin 2m, which is the sense in which GB-CosFace generalises it.

Eval mode never touches the buffers; before the first training step it judges against the
current batch's clamped mean boundary instead. cos_p and cos_n are combined over shards
(`ClassLogits.target` / ``logsumexp``), so every rank holds the same v_i; ``dist.mean_ranks``
on the batch mean only keeps the buffers bit-identical across ranks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from training import dist
from training.heads.logits import ClassLogits
from training.losses import LOSSES
from training.losses.base import LossOutput, MarginSoftmaxLoss


@LOSSES.register("gb_cosface")
class GBCosFaceLoss(MarginSoftmaxLoss):
    """Two logistic terms against the blended boundary v̂_i; see the module docstring."""

    def __init__(
        self,
        scale: float = 32.0,
        margin: float = 0.16,
        alpha: float = 0.15,
        update_rate: float = 0.01,
        min_boundary: float = 0.5,
        max_boundary: float = 0.7,
    ) -> None:
        super().__init__(scale)
        if not min_boundary <= max_boundary:
            raise ValueError(f"need min_boundary <= max_boundary, got {min_boundary} > {max_boundary}")
        self.margin, self.alpha, self.update_rate = margin, alpha, update_rate
        self.min_boundary, self.max_boundary = min_boundary, max_boundary
        # buffers, so the boundary is checkpointed and resumes with the model
        self.register_buffer("boundary", torch.zeros(()))
        self.register_buffer("boundary_initialised", torch.zeros((), dtype=torch.bool))

    def positive_negative(self, logits: ClassLogits) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos_p, cos_n) over every shard's columns, each of shape (B,)."""
        cos_p = logits.target(logits.cos)
        cos_n = logits.logsumexp(self.scale * logits.cos, logits.negative_mask()) / self.scale
        return cos_p, cos_n

    @torch.no_grad()
    def global_boundary(self, batch_mean: torch.Tensor) -> torch.Tensor:
        """Clamped V used this step; in training mode initialise V on the first call and update it."""
        if not self.training:
            current = self.boundary if bool(self.boundary_initialised) else batch_mean
            return current.clamp(self.min_boundary, self.max_boundary)
        if not bool(self.boundary_initialised):
            self.boundary.copy_(batch_mean)
            self.boundary_initialised.fill_(True)
        used = self.boundary.clamp(self.min_boundary, self.max_boundary)
        self.boundary.copy_((1.0 - self.update_rate) * used + self.update_rate * batch_mean)
        return used

    def forward(self, logits: ClassLogits) -> LossOutput:
        cos_p, cos_n = self.positive_negative(logits)
        v = ((cos_p + cos_n) / 2).detach()  # (B,)
        batch_mean = dist.mean_ranks(v.mean()).to(self.boundary.dtype)
        v_hat = v + self.alpha * (self.global_boundary(batch_mean).to(v.dtype) - v)
        s, m = self.scale, self.margin
        positive = -F.logsigmoid(2 * s * (cos_p - m - v_hat)).mean() / 2
        negative = -F.logsigmoid(2 * s * (v_hat - m - cos_n)).mean() / 2
        # plain scaled cosines: not what the loss is a softmax of, but what accuracy is read from
        return LossOutput(positive + negative, s * logits.cos, {"positive": positive, "negative": negative})
