"""Pieces shared by the backbones: the contract's base class and conv-BN(-PReLU) blocks."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FaceBackbone(nn.Module):
    """Base of every backbone: ``forward = forward_head ∘ forward_features``.

    Subclasses set ``embedding_size``, ``dropout`` (an ``nn.Dropout`` holding the default
    probability; it has no weights, so it never shows in a state dict) and
    ``intermediate_channels`` (channels of each map `forward_intermediates` returns), override
    ``input_size`` (side of the square input) where it is not 112, and implement
    `forward_features`, `embed` and `forward_intermediates`.
    No autocast in here: mixed precision is the trainer's decision.
    """

    input_size: int = 112
    embedding_size: int
    dropout: nn.Dropout
    intermediate_channels: tuple[int, ...]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> the last feature map (B, C, h, w)."""
        raise NotImplementedError

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, S, S) -> the output map of every stage, shallowest first."""
        raise NotImplementedError

    def embed(self, feat: torch.Tensor) -> torch.Tensor:
        """The embedding layers after dropout: (B, C, h, w) -> (B, embedding_size)."""
        raise NotImplementedError

    def forward_head(self, feat: torch.Tensor, dropout: float | None = None) -> torch.Tensor:
        """Dropout (probability `dropout` if given, else the model's) on the feature map, then `embed`.

        F.dropout rather than the module so that one feature map can be dropped out several times
        with different probabilities (CoReFace); never in place, since the caller may reuse `feat`.
        """
        p = self.dropout.p if dropout is None else dropout
        return self.embed(F.dropout(feat, p=p, training=self.training))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ConvBlock(nn.Module):
    """Conv (no bias) -> BN -> PReLU. The ``layers`` name keeps insightface's state-dict keys."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) -> BN, no activation: the projection of a bottleneck and the GDC."""

    def __init__(self, in_c: int, out_c: int, kernel: int = 1, stride: int = 1, padding: int = 0, groups: int = 1) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride, padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)
