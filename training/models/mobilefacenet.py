"""MobileFaceNet (Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face
Verification on Mobile Devices", arXiv 1804.07573), with PReLU as in insightface.

Table 1 of the paper (t = expansion of the bottleneck's hidden width over its input):

  conv 3x3 s2 64 -> depthwise 3x3 64                                  (B, 64, 56, 56)
  bottleneck t2 64 s2, then 4 x (t2 64)                               (B, 64, 28, 28)
  bottleneck t4 128 s2, then 6 x (t2 128)                             (B, 128, 14, 14)
  bottleneck t4 128 s2, then 2 x (t2 128)                             (B, 128, 7, 7)
  conv 1x1 512                                                        = forward_features (B, 512, 7, 7)
  head: GDC (7x7 depthwise, no padding, + BN) -> flatten -> Linear(512, D, no bias) -> BN1d

Module names follow insightface `arcface_torch/backbones/mobilefacenet.py` (`layers`, `conv_sep`,
`features`), and at width_mult 1 this is its MobileFaceNet(scale=1). insightface's default "mbf"
(scale=2) is a different network: it doubles the block widths but keeps the hidden widths
(128/256/512), so its checkpoints do not load here; `width_mult` scales every width alike.
"""
from __future__ import annotations

import functools

import torch
from torch import nn

from training.models import BACKBONES
from training.models.layers import ConvBlock, FaceBackbone, LinearBlock

# (output channels, expansion of the strided bottleneck, residual bottlenecks after it, their expansion)
STAGES = ((64, 2, 4, 2), (128, 4, 6, 2), (128, 4, 2, 2))
STEM_CHANNELS = 64
SEP_CHANNELS = 512  # the 1x1 conv before the GDC; the paper fixes it at 512 whatever the width
FEATURE_SIDE = 7


def scaled(channels: int, width_mult: float) -> int:
    return max(1, round(channels * width_mult))


class Bottleneck(nn.Module):
    """1x1 expand -> BN -> PReLU -> 3x3 depthwise (stride) -> BN -> PReLU -> 1x1 project -> BN (+ x)."""

    def __init__(self, in_c: int, out_c: int, hidden: int, stride: int = 1, residual: bool = False) -> None:
        super().__init__()
        if residual and (stride != 1 or in_c != out_c):
            raise ValueError("a residual bottleneck keeps resolution and width")
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, hidden),
            ConvBlock(hidden, hidden, kernel=3, stride=stride, padding=1, groups=hidden),
            LinearBlock(hidden, out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return out + x if self.residual else out


class ResidualStack(nn.Module):
    """`blocks` residual bottlenecks at one width (insightface's `Residual`)."""

    def __init__(self, channels: int, blocks: int, hidden: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(*(Bottleneck(channels, channels, hidden, residual=True) for _ in range(blocks)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv: a learnt 7x7 weighting per channel instead of average pooling."""

    def __init__(self, channels: int, embedding_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(channels, channels, kernel=FEATURE_SIDE, groups=channels),  # (B, C, 7, 7) -> (B, C, 1, 1)
            nn.Flatten(),  # (B, C)
            nn.Linear(channels, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MobileFaceNet(FaceBackbone):
    # indices in `layers` after which the resolution drops next: the stem and the three stages
    STAGE_ENDS = (1, 3, 5, 7)

    def __init__(self, embedding_size: int = 512, dropout: float = 0.0, width_mult: float = 1.0) -> None:
        super().__init__()
        if width_mult <= 0:
            raise ValueError(f"width_mult must be positive, got {width_mult}")
        self.embedding_size = embedding_size
        self.dropout = nn.Dropout(dropout)
        width = functools.partial(scaled, width_mult=width_mult)
        stem = width(STEM_CHANNELS)
        self.layers = nn.ModuleList(
            [
                ConvBlock(3, stem, kernel=3, stride=2, padding=1),
                ConvBlock(stem, stem, kernel=3, padding=1, groups=stem),
            ]
        )
        in_c = stem
        for out_c, t_down, blocks, t_res in STAGES:
            out_c = width(out_c)
            self.layers.append(Bottleneck(in_c, out_c, in_c * t_down, stride=2))
            self.layers.append(ResidualStack(out_c, blocks, out_c * t_res))
            in_c = out_c
        self.intermediate_channels = (stem,) + tuple(width(stage[0]) for stage in STAGES)
        self.conv_sep = ConvBlock(in_c, SEP_CHANNELS)
        self.features = GDC(SEP_CHANNELS, embedding_size)
        self._init_weights()

    def _init_weights(self) -> None:
        # insightface's init for this network: He (fan-out) for convs and the embedding layer.
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of the stem and the three stages: 56², 28², 14², 7² maps (channels: intermediate_channels)."""
        maps = []
        for i, layer in enumerate(self.layers):
            x = layer(x)
            if i in self.STAGE_ENDS:
                maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_sep(self.forward_intermediates(x)[-1])  # (B, 512, 7, 7)

    def embed(self, feat: torch.Tensor) -> torch.Tensor:
        return self.features(feat)  # (B, 512, 7, 7) -> (B, D)


@BACKBONES.register("mobilefacenet")
def mobilefacenet(**kwargs) -> MobileFaceNet:
    return MobileFaceNet(**kwargs)
