"""CoReFace: contrastive regularisation between two dropout views of one embedding.

Song and Wang, "CoReFace: Sample-Guided Contrastive Regularization for Deep Face Recognition"
(arXiv 2304.11668); official code github.com/IsidoreSong/CoreFace (``utils/losses.py:ContraFace``).

The augmentation is at the embedding level, not on the image: the backbone's last feature map
is computed once, and two independent dropout masks (p) on the flattened map give two
embeddings z1, z2 through the shared embedding layer: ``model.views(images, (p, p))`` on the
trainer's Embedder (one DDP forward), or ``forward_head(forward_features(x), dropout=p)`` twice
on a bare backbone (the contract in ``training/models/__init__.py``).

Coupling matrix over the global batch (N samples, all ranks):

    C_ij = ẑ1_i · ẑ2_j,   and C_ij := 0 for j ≠ i with y_j = y_i  (set to 0, not removed, so
                                                                    e^0 = 1 stays in the sum)

Adaptive margin (as the official code computes it; m_prev is a buffer starting at 0):

    m_b = mean_i ( C_ii − max(0, max_{j≠i} C_ij) )        (detached, on the masked C)
    m   = μ·m_b + (1 − μ)·m_prev,  μ = 0.99;  then m_prev ← m

Contrastive term (cross-entropy of each row toward its own diagonal, margin on the positive):

    L_C(z1, z2) = −(1/N) Σ_i log( e^{s(C_ii − m)} / (e^{s(C_ii − m)} + Σ_{j≠i} e^{s·C_ij}) ),  s = 64

Total:

    L = w1·base(z1) + w2·base(z2) + w_c·L_C(z1, z2) + w_rev·L_C(z2, z1)
    w1 = w2 = 0.5, w_c = 0.05, w_rev = 0 (the paper's one-way coupling; the official config's
    ``weightC2`` "double-way" protocol is the w_rev parameter), base = ArcFace (s 64, m 0.5).

Choices, each a parameter unless noted:
- Before ``start_epoch`` only the plain base loss on one embedding is used (the paper starts
  CoReFace from an ArcFace model). That embedding uses ``warmup_dropout`` (default 0.0, a
  non-dropout embedding; the official code keeps the backbone's 0.4 there).
- The dropout is ``dropout`` (0.4) and becomes ``late_dropout`` (0.6) from epoch
  ``late_dropout_epoch`` on (None: never); the trainer calls ``set_epoch(epoch)`` every epoch.
  The official code switches at its first learning-rate step (zero-based epoch 7 of 24 on
  MS1MV2), the same epoch at which it starts the two-view training.
- L_C is computed over the global batch: z1, z2 and the labels are gathered from every rank
  (``dist.gather_with_grad``) and the value is wrapped in ``dist.replicated`` so that the
  summed gradients count it once. The official code computes it per GPU; with one process the
  two agree. m_b is therefore identical on every rank and so is the m_prev buffer.
- With w_rev > 0 the reverse term uses C^T (same mask, which is symmetric) with its own
  margin chained after the forward one, as the official code's second call does:
  m_rev = μ·m_b(C^T) + (1 − μ)·m, then m_prev ← m_rev. With w_rev = 0 the reverse term is not
  computed at all; the official code computes it anyway and so also feeds m_b(C^T) into the
  running margin, which moves m by at most 0.01·|m_b(C^T) − m_b(C)| per step.
- Each view goes through the head separately, so with Partial FC sampling (sample_rate < 1)
  each view scores against its own random negatives.
- m_prev is updated only in training mode; in eval mode the margin is computed but not stored.
- C is computed in float32 (under autocast too) because e^{64·C} overflows float16.
- Not clamped to [−1, 1] (the official code clamps): rounding past 1 by 1e-7 changes nothing
  in the softmax, and clamping would zero the gradient of a perfectly aligned pair.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from training import dist
from training.heads.logits import ClassLogits
from training.losses import LOSSES
from training.losses.base import LossOutput
from training.losses.combined_margin import arcface


def coupling_matrix(z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """C_ij = ẑ1_i·ẑ2_j with same-label off-diagonal entries set to 0. Shape (N, N), float32."""
    c = F.normalize(z1.float(), dim=1) @ F.normalize(z2.float(), dim=1).T  # (N, N)
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    return c.masked_fill(same, 0.0)


def adaptive_margin(c: torch.Tensor) -> torch.Tensor:
    """m_b = mean_i(C_ii − max(0, max_{j≠i} C_ij)) on the (masked) coupling matrix; detached scalar."""
    c = c.detach()
    diag = torch.diagonal(c)
    eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    # max over an empty set (N = 1) is −inf, which the max(0, ·) turns into 0
    hardest = c.masked_fill(eye, float("-inf")).max(dim=1).values.clamp(min=0.0)
    return (diag - hardest).mean()


def contrastive_from_matrix(c: torch.Tensor, scale: float, margin: torch.Tensor | float) -> torch.Tensor:
    """−(1/N) Σ_i log softmax_i(s·C_i· with the margin subtracted from C_ii)."""
    eye = torch.eye(c.shape[0], dtype=torch.bool, device=c.device)
    logits = scale * (c - eye * torch.as_tensor(margin, dtype=c.dtype, device=c.device))  # (N, N)
    target = torch.arange(c.shape[0], device=c.device)
    return F.cross_entropy(logits, target)


def coreface_contrastive(
    z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor, scale: float = 64.0, margin: torch.Tensor | float = 0.0
) -> torch.Tensor:
    """L_C(z1, z2) with a given margin (see the module docstring); z are unnormalised (N, D)."""
    return contrastive_from_matrix(coupling_matrix(z1, z2, labels), scale, margin)


def embed_views(model: nn.Module, images: torch.Tensor, dropouts: tuple[float, ...]) -> tuple[torch.Tensor, ...]:
    """One embedding per dropout p from a single feature map.

    `model` is the trainer's Embedder (``views``, which keeps the work inside one DDP forward)
    or a bare backbone keeping the contract of ``training/models/__init__.py``.
    """
    if hasattr(model, "views"):
        return tuple(model.views(images, dropouts))
    feat = model.forward_features(images)  # (B, C, h, w)
    return tuple(model.forward_head(feat, dropout=p) for p in dropouts)


def _weighted(prefix: str, out: LossOutput, weight: float) -> dict[str, torch.Tensor]:
    return {f"{prefix}_{name}": weight * value for name, value in out.parts.items()}


def _build_base(base: dict[str, Any] | nn.Module | None, **context: Any) -> nn.Module:
    if base is None:
        return arcface(scale=64.0, margin=0.5)
    if isinstance(base, nn.Module):
        return base
    # imported here: training.losses imports this module while it is still initialising
    from training.losses import build_loss

    spec = dict(base)
    return build_loss(spec.pop("name"), spec, **{k: v for k, v in context.items() if v is not None})


@LOSSES.register("coreface")
class CoReFaceLoss(nn.Module):
    """Two dropout views scored by a base margin loss, coupled by an adaptive-margin contrastive term."""

    m_prev: torch.Tensor

    def __init__(
        self,
        base: dict[str, Any] | nn.Module | None = None,
        dropout: float = 0.4,
        late_dropout: float = 0.6,
        late_dropout_epoch: int | None = None,
        warmup_dropout: float = 0.0,
        start_epoch: int = 0,
        contrastive_scale: float = 64.0,
        contrastive_weight: float = 0.05,
        reverse_weight: float = 0.0,
        base_weights: tuple[float, float] = (0.5, 0.5),
        margin_momentum: float = 0.99,
        num_classes: int | None = None,
        embedding_size: int | None = None,
    ) -> None:
        super().__init__()
        # the trainer's context (num_classes, embedding_size) goes on to a base that asks for it
        self.base = _build_base(base, num_classes=num_classes, embedding_size=embedding_size)
        self.dropout, self.late_dropout, self.late_dropout_epoch = dropout, late_dropout, late_dropout_epoch
        self.warmup_dropout, self.start_epoch = warmup_dropout, start_epoch
        self.contrastive_scale = contrastive_scale
        self.contrastive_weight, self.reverse_weight = contrastive_weight, reverse_weight
        self.base_weights = tuple(base_weights)
        self.margin_momentum = margin_momentum
        self.epoch = 0
        self.register_buffer("m_prev", torch.zeros(()))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        if hasattr(self.base, "set_epoch"):
            self.base.set_epoch(epoch)

    @property
    def active(self) -> bool:
        return self.epoch >= self.start_epoch

    @property
    def current_dropout(self) -> float:
        late = self.late_dropout_epoch is not None and self.epoch >= self.late_dropout_epoch
        return self.late_dropout if late else self.dropout

    def forward(self, logits: ClassLogits) -> LossOutput:
        """The base loss alone, for callers that have only one embedding's logits."""
        return self.base(logits)

    def next_margin(self, c: torch.Tensor) -> torch.Tensor:
        """m = μ·m_b(C) + (1 − μ)·m_prev; stores it as m_prev in training mode."""
        m = self.margin_momentum * adaptive_margin(c) + (1.0 - self.margin_momentum) * self.m_prev
        if self.training:
            self.m_prev.copy_(m)
        return m

    def forward_batch(self, model: nn.Module, head: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        if not self.active:
            (z,) = embed_views(model, images, (self.warmup_dropout,))
            return self.base(head(z, labels))
        p = self.current_dropout
        z1, z2 = embed_views(model, images, (p, p))  # (B, D) each; independent masks on one feature map
        out1, out2 = self.base(head(z1, labels)), self.base(head(z2, labels))
        w1, w2 = self.base_weights
        parts = {**_weighted("view1", out1, w1), **_weighted("view2", out2, w2), **self.coupling_terms(z1, z2, labels)}
        return LossOutput(sum(parts.values()), out1.logits, parts)

    def coupling_terms(self, z1: torch.Tensor, z2: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """w_c·L_C(z1, z2) (+ w_rev·L_C(z2, z1)) over the global batch."""
        g1, g2 = dist.gather_with_grad(z1), dist.gather_with_grad(z2)  # (N, D) each
        c = coupling_matrix(g1, g2, dist.gather_nograd(labels))  # (N, N)
        terms = {"contrastive": self.contrastive_weight * self.contrastive(c)}
        if self.reverse_weight:
            # the mask is symmetric, so C^T is the masked C of (z2, z1)
            terms["contrastive_reverse"] = self.reverse_weight * self.contrastive(c.T)
        return terms

    def contrastive(self, c: torch.Tensor) -> torch.Tensor:
        """L_C on a global-batch coupling matrix, replicated on every rank."""
        return dist.replicated(contrastive_from_matrix(c, self.contrastive_scale, self.next_margin(c)))
