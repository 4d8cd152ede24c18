"""IResNet-18/50/100, the face recognition ResNets of insightface's arcface_torch.

ResNets built from the "improved residual" unit BN-Conv-BN-PReLU-Conv-BN of ArcFace (Deng et al.,
CVPR 2019), the backbone of ArcFace, MagFace and CoReFace. Layout and parameter names follow
insightface `recognition/arcface_torch/backbones/iresnet.py`, so that its checkpoints (and
MagFace's, after `load_insightface_state_dict` strips their wrapper prefixes) load strictly:

  stem      conv1 3x3 (3 -> 64, stride 1) -> bn1 -> prelu                      (B, 64, 112, 112)
  layer1-4  IBasicBlocks, widths 64/128/256/512, stride 2 in the first block   (B, 512, 7, 7) at the end
  bn2       BatchNorm2d(512)                                                     = forward_features
  head      flatten -> dropout -> fc Linear(512·7·7, D) -> features BatchNorm1d(D), γ frozen at 1
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from training.models import BACKBONES
from training.models.layers import FaceBackbone

STAGE_WIDTHS = (64, 128, 256, 512)
FEATURE_SIDE = 7  # 112 input halved by each of the four stages


class IBasicBlock(nn.Module):
    """out = bn3(conv2_s(prelu(bn2(conv1(bn1(x)))))) + shortcut(x), shortcut = bn(conv1x1_s(x)) or x."""

    def __init__(self, in_c: int, out_c: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_c, eps=1e-5)
        self.conv1 = nn.Conv2d(in_c, out_c, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_c, eps=1e-5)
        self.prelu = nn.PReLU(out_c)
        self.conv2 = nn.Conv2d(out_c, out_c, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_c, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_c != out_c:
            self.downsample = nn.Sequential(nn.Conv2d(in_c, out_c, 1, stride, bias=False), nn.BatchNorm2d(out_c, eps=1e-5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return out + shortcut


def make_stage(in_c: int, out_c: int, blocks: int) -> nn.Sequential:
    """`blocks` IBasicBlocks; the first halves the resolution (and projects the shortcut)."""
    layers = [IBasicBlock(in_c, out_c, stride=2)]
    layers += [IBasicBlock(out_c, out_c) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class IResNet(FaceBackbone):
    def __init__(
        self,
        layers: Sequence[int],
        embedding_size: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        self.embedding_size = embedding_size
        self.intermediate_channels = STAGE_WIDTHS
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64, eps=1e-5)
        self.prelu = nn.PReLU(64)
        in_widths = (64,) + STAGE_WIDTHS[:-1]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            make_stage(i, o, n) for i, o, n in zip(in_widths, STAGE_WIDTHS, layers, strict=True)
        )
        self.bn2 = nn.BatchNorm2d(STAGE_WIDTHS[-1], eps=1e-5)
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(STAGE_WIDTHS[-1] * FEATURE_SIDE * FEATURE_SIDE, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights(zero_init_residual)

    def _init_weights(self, zero_init_residual: bool) -> None:
        # He (fan-out) convs as MagFace's IResNet; insightface draws N(0, 0.1) instead. Every conv
        # feeds a BN, so in training only the effective learning rate depends on this scale, but
        # with N(0, 0.1) an untrained IResNet-100 in eval mode (identity BN statistics) overflows
        # to NaN, and He keeps it finite. BN at identity, fc left at PyTorch's default (as both).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # The embedding BN only centres and rescales per feature; a learnt γ would let the network
        # shrink features instead of separating them, so insightface pins it at 1.
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)
        if zero_init_residual:
            # each residual branch starts at zero, so every block starts as its shortcut.
            # (insightface's flag zeroes bn2, the middle BN; bn3 is the branch's last.)
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.zeros_(m.bn3.weight)

    def stages(self) -> tuple[nn.Module, ...]:
        return (self.layer1, self.layer2, self.layer3, self.layer4)

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of layer1..layer4: (B, 64, 56, 56), (B, 128, 28, 28), (B, 256, 14, 14), (B, 512, 7, 7)."""
        x = self.prelu(self.bn1(self.conv1(x)))  # (B, 64, 112, 112)
        maps = []
        for stage in self.stages():
            x = stage(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.forward_intermediates(x)[-1])  # (B, 512, 7, 7)

    def embed(self, feat: torch.Tensor) -> torch.Tensor:
        return self.features(self.fc(torch.flatten(feat, 1)))  # (B, 512·7·7) -> (B, D)


@BACKBONES.register("iresnet18")
def iresnet18(**kwargs) -> IResNet:
    return IResNet((2, 2, 2, 2), **kwargs)


@BACKBONES.register("iresnet50")
def iresnet50(**kwargs) -> IResNet:
    return IResNet((3, 4, 14, 3), **kwargs)


@BACKBONES.register("iresnet100")
def iresnet100(**kwargs) -> IResNet:
    return IResNet((3, 13, 30, 3), **kwargs)


# Wrappers other trainers save around the backbone: MagFace's `features.module.` (its backbone
# inside DataParallel inside its builder), the reverse order, and plain DataParallel/DDP.
WRAPPER_PREFIXES = ("features.module.", "module.features.", "module.", "")


def strip_wrapper_prefix(
    state_dict: Mapping[str, torch.Tensor], expected: set[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(the keys under the wrapper prefix that best explains `expected`, stripped; the other keys).

    Chosen by match rather than by first hit: a DDP-saved insightface model has keys
    `module.features.weight` that are the backbone's own `features` BN, not a wrapper.
    The other keys belong to the rest of the saved model (MagFace's classifier `fc.weight`).
    """

    def under(prefix: str) -> dict[str, torch.Tensor]:
        return {key[len(prefix):]: value for key, value in state_dict.items() if key.startswith(prefix)}

    prefix = max(WRAPPER_PREFIXES, key=lambda p: len(expected.intersection(under(p))))  # ties: first listed
    return under(prefix), [key for key in state_dict if not key.startswith(prefix)]


def load_insightface_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    """Load an insightface/MagFace IResNet checkpoint strictly; returns the keys left out.

    Accepts the bare state dict or a checkpoint holding it under "state_dict" (MagFace's files).
    MagFace's BNs use eps 2e-5 (ours 1e-5, as insightface), so its weights give embeddings that
    differ from MagFace's own code by that eps in every BN: small wherever running variances are
    far above 1e-5, but not bit-identical.
    """
    if isinstance(state_dict.get("state_dict"), Mapping):
        state_dict = state_dict["state_dict"]
    cleaned, dropped = strip_wrapper_prefix(state_dict, set(model.state_dict()))
    model.load_state_dict(cleaned, strict=True)
    return dropped
