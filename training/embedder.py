"""What a loss sees of the backbone during training.

DDP only synchronises gradients for work done inside one forward() of the wrapped module, so
every way a loss may embed a batch is a mode of `EmbedderModule.forward`, and DDP wraps that.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class EmbedderModule(nn.Module):
    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor, dropouts: Sequence[float] | None = None):
        if dropouts is None:
            return _loss_precision(self.backbone(x))
        feat = self.backbone.forward_features(x)  # (B, C, h, w), computed once for every view
        return tuple(_loss_precision(self.backbone.forward_head(feat, dropout=p)) for p in dropouts)


def _loss_precision(e: torch.Tensor) -> torch.Tensor:
    """At least float32 for the loss (AMP gives float16); float64 stays float64."""
    return e if e.dtype == torch.float64 else e.float()


class Embedder:
    """`embedder(images)` -> (B, D); `embedder.views(images, [p1, p2])` -> one embedding per dropout p."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module  # EmbedderModule, or DDP around one

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def views(self, images: torch.Tensor, dropouts: Sequence[float]) -> tuple[torch.Tensor, ...]:
        return self.module(images, dropouts=tuple(dropouts))
