"""ArcFace / CosFace / SphereFace-style combined margin.

Target logit s·(cos(m1·θ_y + m2) − m3).  ArcFace: (1, 0.5, 0); CosFace: (1, 0, 0.35); s = 64.
Deng et al., "ArcFace" (CVPR 2019); Wang et al., "CosFace" (CVPR 2018).

Where θ_y + m2 would pass π the target logit is no longer monotonic in θ; following insightface
we then fall back to cos θ_y − m2·sin(m2) (the linear extension), unless ``easy_margin`` keeps
the plain cosine wherever cos θ_y ≤ 0.
"""
from __future__ import annotations

import math

import torch

from training.heads.logits import ClassLogits
from training.losses import LOSSES
from training.losses.base import MarginSoftmaxLoss


def combined_margin_target(cos_y: torch.Tensor, m1: float, m2, m3: float, easy_margin: bool = False) -> torch.Tensor:
    """cos(m1·θ + m2) − m3 with the usual monotonic fallback; m2 may be a per-sample tensor.

    Computed in float32 at least and returned in cos_y's dtype: under autocast cos_y is float16 or bfloat16,
    where 1 − 1e-7 rounds to 1, so the clamp would keep cos θ = 1 and acos's gradient there is −inf."""
    dtype = cos_y.dtype
    cos_y = cos_y.to(torch.promote_types(dtype, torch.float32))
    m2 = torch.as_tensor(m2, dtype=cos_y.dtype, device=cos_y.device)
    theta = torch.acos(cos_y.clamp(-1 + 1e-7, 1 - 1e-7))
    target = torch.cos(m1 * theta + m2) - m3
    if easy_margin:
        return torch.where(cos_y > 0, target, cos_y - m3).to(dtype)
    if m1 == 1.0:
        # beyond θ = π − m2 the margin would reward moving away from the center
        fallback = cos_y - m2 * torch.sin(m2) - m3
        target = torch.where(theta + m2 <= math.pi, target, fallback)
    return target.to(dtype)


@LOSSES.register("combined_margin")
class CombinedMarginLoss(MarginSoftmaxLoss):
    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0, easy_margin: bool = False) -> None:
        super().__init__(scale)
        self.m1, self.m2, self.m3, self.easy_margin = m1, m2, m3, easy_margin

    def target_logit(self, cos_y: torch.Tensor, logits: ClassLogits) -> torch.Tensor:
        return combined_margin_target(cos_y, self.m1, self.m2, self.m3, self.easy_margin)


@LOSSES.register("arcface")
def arcface(scale: float = 64.0, margin: float = 0.5, easy_margin: bool = False) -> CombinedMarginLoss:
    return CombinedMarginLoss(scale, 1.0, margin, 0.0, easy_margin)


@LOSSES.register("cosface")
def cosface(scale: float = 64.0, margin: float = 0.35) -> CombinedMarginLoss:
    return CombinedMarginLoss(scale, 1.0, 0.0, margin)
