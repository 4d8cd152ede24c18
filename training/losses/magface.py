"""MagFace: a magnitude-aware angular margin whose feature norm doubles as a quality score.

Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality Assessment"
(CVPR 2021, arXiv 2103.06627). With f the raw (unnormalised) embedding:

    a    = clamp(‖f‖, l_a, u_a)
    m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m           (linear, l_m at l_a, u_m at u_a)
    g(a) = a/u_a² + 1/a                                       (convex, decreasing on [l_a, u_a])
    L    = CE(target logit s·cos(θ_y + m(a))) + λ_g·mean_i g(a_i)

Defaults l_a 10, u_a 110, l_m 0.45, u_m 0.8, λ_g 35, s 64. The official code uses an easy margin
by default: where cos θ_y ≤ 0 the target logit stays s·cos θ_y. Without it, past θ_y + m(a) = π
we fall back to cos θ_y − m(a)·sin m(a), as ``combined_margin_target`` does.
``mag_cosface`` keeps the regulariser but uses the CosFace form s·(cos θ_y − m(a)).

Gradients, as in the official code: g and m are computed on the *clamped* magnitude, so a sample
whose ‖f‖ lies outside [l_a, u_a] gets no gradient on its magnitude from either term (torch.clamp
passes gradient only inside the bounds, ends included). Inside, dg/da = 1/u_a² − 1/a² < 0, so
the regulariser raises the magnitude, while the margin term (m grows with a) pulls it down; the
balance is what ties ‖f‖ to recognisability. The margin keeps its gradient to a.

Distributed: the margin enters only through `with_target` on local rows, so each sample's margin
is differentiated on exactly one rank; the regulariser is computed from the gathered embeddings
on every rank and therefore goes through ``dist.replicated``.
"""
from __future__ import annotations

import torch

from training import dist
from training.heads.logits import ClassLogits
from training.losses import LOSSES
from training.losses.base import MarginSoftmaxLoss
from training.losses.combined_margin import combined_margin_target


def magface_margin(a: torch.Tensor, l_a: float = 10.0, u_a: float = 110.0, l_m: float = 0.45, u_m: float = 0.8) -> torch.Tensor:
    """m(a) = (u_m − l_m)/(u_a − l_a)·(a − l_a) + l_m, for an already clamped magnitude a."""
    return (u_m - l_m) / (u_a - l_a) * (a - l_a) + l_m


def magface_regularizer(a: torch.Tensor, u_a: float = 110.0) -> torch.Tensor:
    """g(a) = a/u_a² + 1/a, per sample; minimised at a = u_a on the clamped range."""
    return a / u_a**2 + 1.0 / a


@LOSSES.register("magface")
class MagFaceLoss(MarginSoftmaxLoss):
    """CE with target logit s·cos(θ_y + m(a)) plus λ_g·mean g(a); see the module docstring."""

    def __init__(
        self,
        scale: float = 64.0,
        l_a: float = 10.0,
        u_a: float = 110.0,
        l_m: float = 0.45,
        u_m: float = 0.8,
        lambda_g: float = 35.0,
        easy_margin: bool = True,
    ) -> None:
        super().__init__(scale)
        if not 0.0 < l_a < u_a:
            raise ValueError(f"need 0 < l_a < u_a, got l_a={l_a}, u_a={u_a}")
        self.l_a, self.u_a, self.l_m, self.u_m = l_a, u_a, l_m, u_m
        self.lambda_g, self.easy_margin = lambda_g, easy_margin

    def magnitude(self, logits: ClassLogits) -> torch.Tensor:
        """a = clamp(‖f‖, l_a, u_a) of every gathered embedding. Shape (B,)."""
        return logits.embeddings.norm(dim=1).clamp(self.l_a, self.u_a)

    def apply_margin(self, cos_y: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        """cos(θ_y + m) with the easy margin or the monotonic fallback."""
        return combined_margin_target(cos_y, 1.0, margin, 0.0, self.easy_margin)

    def target_logit(self, cos_y: torch.Tensor, logits: ClassLogits) -> torch.Tensor:
        margin = magface_margin(self.magnitude(logits), self.l_a, self.u_a, self.l_m, self.u_m)
        return self.apply_margin(cos_y, margin.to(cos_y.dtype))

    def extra_terms(self, logits: ClassLogits) -> dict[str, torch.Tensor]:
        g = magface_regularizer(self.magnitude(logits), self.u_a).mean()
        # every rank computes g on the same gathered embeddings: count it once over ranks
        return {"magnitude": dist.replicated(self.lambda_g * g)}


@LOSSES.register("mag_cosface")
class MagCosFaceLoss(MagFaceLoss):
    """CosFace form with the magnitude-aware margin: target logit s·(cos θ_y − m(a)), same regulariser.

    Parameters and defaults are MagFace's (its angular ones: a cosine margin of 0.45–0.8 is harsher
    than CosFace's usual 0.35–0.4, so configs will usually lower l_m/u_m). ``easy_margin`` has no
    effect: cos θ_y − m is monotonic in θ_y everywhere and needs no fallback.
    """

    def apply_margin(self, cos_y: torch.Tensor, margin: torch.Tensor) -> torch.Tensor:
        return cos_y - margin
