"""The shared margin-softmax base.

A margin loss rewrites the target cosine of every sample (``target_logit``), scales all logits
by s and takes the softmax cross-entropy over every class of every shard. Subclasses override
``target_logit`` (and ``extra_terms`` for regularisers); losses that are not a softmax
(GB-CosFace) override ``forward``. Losses that need more than one embedding per image
(CoReFace) override ``forward_batch``, which the trainer calls.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from training.heads.logits import ClassLogits


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar to back-propagate
    logits: torch.Tensor | None = None  # (B, C_local) scaled logits after the margin, for inspection
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # named scalar terms, for logging


class MarginSoftmaxLoss(nn.Module):
    """Softmax cross-entropy with target logit s·ψ(cos θ_y); ψ is the identity here."""

    def __init__(self, scale: float = 64.0) -> None:
        super().__init__()
        self.scale = scale

    def target_logit(self, cos_y: torch.Tensor, logits: ClassLogits) -> torch.Tensor:
        """ψ(cos θ_y) for every row (rows whose label is on another rank are ignored). Shape (B,)."""
        return cos_y

    def extra_terms(self, logits: ClassLogits) -> dict[str, torch.Tensor]:
        """Named scalar terms added to the cross-entropy (regularisers)."""
        return {}

    def forward(self, logits: ClassLogits) -> LossOutput:
        cos_y = logits.target_local(logits.cos)
        scaled = self.scale * logits.with_target(logits.cos, self.target_logit(cos_y, logits))
        parts = {"ce": logits.cross_entropy(scaled), **self.extra_terms(logits)}
        return LossOutput(sum(parts.values()), scaled, parts)

    def forward_batch(self, model: nn.Module, head: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> LossOutput:
        """One training step's loss. `model` is a training.embedder.Embedder: model(images) -> (B, D)."""
        return self(head(model(images), labels))
