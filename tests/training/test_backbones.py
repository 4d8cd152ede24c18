"""Every registered backbone against the contract of training/models/__init__.py, plus
architecture checks against published parameter and compute figures and known-value
checks of the building blocks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from training import models
from training.models import BACKBONES, build_backbone
from training.models.iresnet import IBasicBlock, load_insightface_state_dict
from training.models.mobilefacenet import Bottleneck

models._import_all()  # registration happens on import; the test list must see every backbone
NAMES = BACKBONES.names()
SLOW = {"iresnet100"}  # ~0.4 s per image forward on one core: eval mode, batch 1 only

# Published sizes (parameters, millions; (low, high)) and compute (multiply-accumulates per
# 112x112 face, G). Sources:
#  - IResNet-100: OpenVINO Open Model Zoo card of insightface's LResNet100E-IR
#    (face-recognition-resnet100-arcface-onnx): 65.132 MParams; 12.1 G MACs in docs REFERENCE
#    (the card's 24.2 GFLOPs is 2 x MACs).
#  - IResNet-50: 6.3 G MACs (REFERENCE); 43.6 M params as commonly quoted for arcface_torch r50,
#    not confirmed from a primary table; the closed-form count below checks the layout instead.
#  - IResNet-18: 24.0 M params, same caveat.
#  - MobileFaceNet: Chen et al. 2018 (arXiv 1804.07573), Table 2: 0.99 M params with a 128-d
#    embedding, 221 M MAdds. With the default 512-d embedding the GDC linear adds 384·512 weights
#    and 2·384 BN parameters: 1.20 M. (REFERENCE's 0.45 G is insightface's "mbf", scale 2, not this.)
PUBLISHED_PARAMS_M = {
    "iresnet18": (23.9, 24.1),
    "iresnet50": (43.5, 43.7),
    "iresnet100": (65.0, 65.3),
    "mobilefacenet": (1.0, 2.1),
}
PUBLISHED_GMACS = {"iresnet50": 6.3, "iresnet100": 12.1, "mobilefacenet": 0.221}
IRESNET_LAYERS = {"iresnet18": (2, 2, 2, 2), "iresnet50": (3, 4, 14, 3), "iresnet100": (3, 13, 30, 3)}
# the four 112x112 backbones of this module end at 512x7x7 and have maps at 56, 28, 14, 7
LAST_MAP = {name: (512, 7, 7) for name in PUBLISHED_PARAMS_M}
STAGE_SIDES = {name: (56, 28, 14, 7) for name in PUBLISHED_PARAMS_M}


@pytest.fixture(scope="module")
def built() -> dict[str, nn.Module]:
    """Each backbone built once per module (building IResNet-100 alone takes over a second)."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return {name: build_backbone(name) for name in NAMES}


def meta_backbone(name: str, **kwargs) -> nn.Module:
    """The backbone on the meta device: shapes and counts without memory or compute."""
    with torch.device("meta"):
        return build_backbone(name, **kwargs)


def images(model: nn.Module, batch: int, device: str = "cpu") -> torch.Tensor:
    side = getattr(model, "input_size", 112)
    return torch.randn(batch, 3, side, side, device=device)


def count_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-accumulates of conv and linear layers for one forward of x."""
    total = 0

    def hook(module: nn.Module, inputs, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(module, nn.Conv2d):
            total += out.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, nn.Linear):
            total += out.numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    model(x)
    for handle in handles:
        handle.remove()
    return total


def iresnet_param_count(layers: tuple[int, ...], emb: int = 512) -> int:
    """Closed form from the insightface layout: stem, IBasicBlocks, BN2d + fc + BN1d head."""
    bn = 2  # γ, β per channel
    total = 3 * 64 * 9 + bn * 64 + 64
    in_c = 64
    for width, blocks in zip((64, 128, 256, 512), layers):
        for i in range(blocks):
            c = in_c if i == 0 else width
            total += bn * c + c * width * 9 + bn * width + width + width * width * 9 + bn * width
            if i == 0:  # projected shortcut: conv1x1 + BN
                total += c * width + bn * width
        in_c = width
    return total + bn * 512 + 512 * 49 * emb + emb + bn * emb


def insightface_iresnet_keys(layers: tuple[int, ...]) -> set[str]:
    """The state-dict keys of insightface's arcface_torch IResNet with these stage depths."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "prelu.weight", "fc.weight", "fc.bias"}
    keys |= {f"{m}.{p}" for m in ("bn1", "bn2", "features") for p in bn}
    for stage, blocks in enumerate(layers, start=1):
        for i in range(blocks):
            block = f"layer{stage}.{i}"
            keys |= {f"{block}.conv1.weight", f"{block}.conv2.weight", f"{block}.prelu.weight"}
            keys |= {f"{block}.{m}.{p}" for m in ("bn1", "bn2", "bn3") for p in bn}
            if i == 0:
                keys |= {f"{block}.downsample.0.weight"} | {f"{block}.downsample.1.{p}" for p in bn}
    return keys


def randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine terms, so eval-mode checks exercise them."""
    for m in module.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen))
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            if m.weight.requires_grad:
                m.weight.data.copy_(torch.randn(m.num_features, generator=gen))
            m.bias.data.copy_(torch.randn(m.num_features, generator=gen))
        elif isinstance(m, nn.PReLU):
            m.weight.data.copy_(torch.rand(m.num_parameters, generator=gen))


# ---------------------------------------------------------------- the contract, every backbone


@pytest.mark.parametrize("name", NAMES)
def test_forward_shapes_and_composition(name: str, built: dict[str, nn.Module]) -> None:
    model = built[name]
    emb = model.embedding_size
    if name not in SLOW:
        model.train()
        out = model(images(model, 2))
        assert out.shape == (2, emb) and torch.isfinite(out).all()
    model.eval()
    x = images(model, 1 if name in SLOW else 2)
    with torch.no_grad():
        feat = model.forward_features(x)
        assert feat.ndim == 4 and feat.shape[0] == x.shape[0]
        assert tuple(feat.shape[1:]) == LAST_MAP.get(name, tuple(feat.shape[1:]))
        out = model(x)
        assert out.shape == (x.shape[0], emb) and torch.isfinite(out).all()
        torch.testing.assert_close(out, model.forward_head(feat), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_forward_intermediates(name: str, built: dict[str, nn.Module]) -> None:
    model = built[name].eval()
    with torch.no_grad():
        maps = model.forward_intermediates(images(model, 1))
    assert [m.shape[:2] for m in maps] == [(1, c) for c in model.intermediate_channels]
    assert all(m.ndim == 4 and torch.isfinite(m).all() for m in maps)
    if name in STAGE_SIDES:
        assert [m.shape[2:] for m in maps] == [(s, s) for s in STAGE_SIDES[name]]


@pytest.mark.parametrize("name", NAMES)
def test_dropout_override(name: str, built: dict[str, nn.Module]) -> None:
    model = built[name]
    feat_shape = meta_backbone(name).eval().forward_features(images(model, 4, device="meta")).shape
    feat = torch.randn(feat_shape)
    with torch.no_grad():
        model.train()
        plain = model.forward_head(feat)
        torch.testing.assert_close(model.forward_head(feat, dropout=0.0), plain)  # p 0: deterministic
        first, second = model.forward_head(feat, dropout=0.4), model.forward_head(feat, dropout=0.4)
        assert not torch.allclose(first, plain, atol=1e-3)
        assert not torch.allclose(first, second, atol=1e-3)  # two embeddings from one map (CoReFace)
        model.eval()
        torch.testing.assert_close(model.forward_head(feat, dropout=0.4), model.forward_head(feat))


@pytest.mark.parametrize("name", NAMES)
def test_gradients_reach_first_conv(name: str, built: dict[str, nn.Module]) -> None:
    model = built[name]
    model.zero_grad()
    model.train(name not in SLOW)  # eval-mode BN works at batch 1
    model(images(model, 1 if name in SLOW else 2)).square().sum().backward()
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    assert first_conv.weight.grad is not None and first_conv.weight.grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS_M))
def test_parameter_count_matches_published(name: str) -> None:
    low, high = PUBLISHED_PARAMS_M[name]
    count = sum(p.numel() for p in meta_backbone(name).parameters())
    assert low * 1e6 <= count <= high * 1e6


@pytest.mark.parametrize("name", sorted(PUBLISHED_GMACS))
def test_compute_matches_published(name: str) -> None:
    macs = count_macs(meta_backbone(name).eval(), torch.empty(1, 3, 112, 112, device="meta"))
    assert macs / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.01)


@pytest.mark.parametrize("name", NAMES)
def test_embedding_size_is_configurable(name: str) -> None:
    model = meta_backbone(name, embedding_size=64, dropout=0.2)
    assert model.embedding_size == 64
    assert model(images(model, 2, device="meta")).shape == (2, 64)


# ---------------------------------------------------------------- IResNet


@pytest.mark.parametrize("name", sorted(IRESNET_LAYERS))
def test_iresnet_parameters_follow_the_layout(name: str) -> None:
    model = meta_backbone(name)
    layers = IRESNET_LAYERS[name]
    assert sum(p.numel() for p in model.parameters()) == iresnet_param_count(layers)
    assert set(model.state_dict()) == insightface_iresnet_keys(layers)


def test_iresnet_embedding_bn_weight_frozen_at_one(built: dict[str, nn.Module]) -> None:
    features = built["iresnet18"].features
    assert not features.weight.requires_grad
    assert torch.equal(features.weight, torch.ones(512))


def test_ibasicblock_matches_its_equation() -> None:
    """bn3(conv2_s(prelu(bn2(conv1(bn1 x))))) + bn_d(conv1x1_s x), in float64 with F.* ops."""
    gen = torch.Generator().manual_seed(1)
    block = IBasicBlock(4, 6, stride=2).double().eval()
    randomise_bn(block, gen)
    x = torch.randn(2, 4, 8, 8, generator=gen, dtype=torch.float64)

    def bn(m: nn.BatchNorm2d, t: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(t, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps)

    branch = bn(block.bn1, x)
    branch = F.conv2d(branch, block.conv1.weight, padding=1)
    branch = F.prelu(bn(block.bn2, branch), block.prelu.weight)
    branch = bn(block.bn3, F.conv2d(branch, block.conv2.weight, stride=2, padding=1))
    shortcut = bn(block.downsample[1], F.conv2d(x, block.downsample[0].weight, stride=2))
    with torch.no_grad():
        torch.testing.assert_close(block(x), branch + shortcut)
        assert block(x).shape == (2, 6, 4, 4)


def test_iresnet_head_is_flatten_fc_bn() -> None:
    gen = torch.Generator().manual_seed(2)
    model = build_backbone("iresnet18", embedding_size=16).eval()
    randomise_bn(model.features, gen)
    feat = torch.randn(3, 512, 7, 7, generator=gen)
    fc = feat.double().reshape(3, -1) @ model.fc.weight.double().T + model.fc.bias.double()  # (3, 16)
    bn = model.features
    expected = (fc - bn.running_mean.double()) / torch.sqrt(bn.running_var.double() + bn.eps) + bn.bias.double()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_head(feat).double(), expected, rtol=1e-4, atol=1e-4)


def test_zero_init_residual_makes_blocks_identities() -> None:
    model = build_backbone("iresnet18", zero_init_residual=True)
    assert all(torch.all(m.bn3.weight == 0) for m in model.modules() if isinstance(m, IBasicBlock))
    x = torch.randn(2, 64, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.layer1[1](x), x)  # stride 1, no projection


# ---------------------------------------------------------------- checkpoint loading


@pytest.fixture
def iresnet18_pair(built: dict[str, nn.Module]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A fresh IResNet-18 and the state dict of a differently initialised one."""
    torch.manual_seed(3)
    target = build_backbone("iresnet18")
    source = {k: v.clone() for k, v in built["iresnet18"].state_dict().items()}
    assert not torch.equal(target.conv1.weight, source["conv1.weight"])
    return target, source


@pytest.mark.parametrize("prefix", ["features.module.", "module.features.", "module.", ""])
def test_load_insightface_state_dict_round_trip(prefix: str, iresnet18_pair) -> None:
    target, source = iresnet18_pair
    # "module." also checks that a DDP-saved backbone's own `module.features.*` keys (its BN1d)
    # are not mistaken for MagFace's `module.features.` wrapper
    saved = {prefix + k: v for k, v in source.items()}
    if prefix:
        saved["fc.weight"] = torch.zeros(512, 10)  # MagFace's classifier, beside the backbone
    dropped = load_insightface_state_dict(target, {"state_dict": saved} if prefix == "features.module." else saved)
    assert dropped == (["fc.weight"] if prefix else [])
    loaded = target.state_dict()
    assert set(loaded) == set(source)
    assert all(torch.equal(loaded[k], source[k]) for k in source)


def test_load_insightface_state_dict_is_strict(iresnet18_pair) -> None:
    target, source = iresnet18_pair
    saved = {"features.module." + k: v for k, v in source.items() if k != "layer4.1.conv2.weight"}
    with pytest.raises(RuntimeError, match="layer4.1.conv2.weight"):
        load_insightface_state_dict(target, saved)


# ---------------------------------------------------------------- MobileFaceNet


def test_bottleneck_matches_its_equation() -> None:
    """bn(conv1x1(prelu(bn(dw3x3_s(prelu(bn(conv1x1 x))))))) + x, in float64 with F.* ops."""
    gen = torch.Generator().manual_seed(4)
    block = Bottleneck(4, 4, hidden=8, residual=True).double().eval()
    randomise_bn(block, gen)
    x = torch.randn(2, 4, 6, 6, generator=gen, dtype=torch.float64)
    expand, depthwise, project = block.layers

    def conv_bn(blk: nn.Module, t: torch.Tensor, **conv_kwargs) -> torch.Tensor:
        conv, bn = blk.layers[0], blk.layers[1]
        t = F.conv2d(t, conv.weight, **conv_kwargs)
        return F.batch_norm(t, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)

    t = F.prelu(conv_bn(expand, x), expand.layers[2].weight)
    t = F.prelu(conv_bn(depthwise, t, padding=1, groups=8), depthwise.layers[2].weight)
    with torch.no_grad():
        torch.testing.assert_close(block(x), conv_bn(project, t) + x)


# Shapes in insightface's arcface_torch MobileFaceNet(scale=1), read off its constructor:
# layers.1 depthwise 64 (groups 64), hidden widths 128 / 256 / 512 at the strided bottlenecks.
INSIGHTFACE_MBF_SCALE1_SHAPES = {
    "layers.0.layers.0.weight": (64, 3, 3, 3),
    "layers.1.layers.0.weight": (64, 1, 3, 3),
    "layers.2.layers.0.layers.0.weight": (128, 64, 1, 1),
    "layers.3.layers.3.layers.2.layers.0.weight": (64, 128, 1, 1),
    "layers.4.layers.0.layers.0.weight": (256, 64, 1, 1),
    "layers.5.layers.5.layers.1.layers.0.weight": (256, 1, 3, 3),
    "layers.6.layers.1.layers.0.weight": (512, 1, 3, 3),
    "layers.7.layers.1.layers.2.layers.1.running_var": (128,),
    "conv_sep.layers.0.weight": (512, 128, 1, 1),
    "features.layers.0.layers.0.weight": (512, 1, 7, 7),
    "features.layers.2.weight": (512, 512),
    "features.layers.3.running_mean": (512,),
}


def test_mobilefacenet_keys_match_insightface_scale1() -> None:
    state = meta_backbone("mobilefacenet").state_dict()
    assert {k: tuple(state[k].shape) for k in INSIGHTFACE_MBF_SCALE1_SHAPES if k in state} == INSIGHTFACE_MBF_SCALE1_SHAPES
    assert "layers.8.layers.0.weight" not in state and "layers.7.layers.2.layers.0.layers.0.weight" not in state


def test_mobilefacenet_width_mult_scales_the_stages() -> None:
    model = meta_backbone("mobilefacenet", width_mult=0.5)
    assert model.intermediate_channels == (32, 32, 64, 64)
    maps = model.forward_intermediates(torch.empty(1, 3, 112, 112, device="meta"))
    assert [m.shape[1] for m in maps] == [32, 32, 64, 64]
    assert model.forward_features(torch.empty(1, 3, 112, 112, device="meta")).shape == (1, 512, 7, 7)


def test_mobilefacenet_with_128d_embedding_is_the_papers_size() -> None:
    """Chen et al. 2018, Table 2: MobileFaceNet has 0.99 M parameters (128-d embedding)."""
    count = sum(p.numel() for p in meta_backbone("mobilefacenet", embedding_size=128).parameters())
    assert count / 1e6 == pytest.approx(0.99, abs=0.015)


def test_settle_batchnorm_keeps_the_plain_average_of_the_batches_statistics():
    """Two batches of known means (1 and 3 per channel) and variances: the running mean is their plain average, 2,
    not the default momentum's 0.1-weighted one (0.37)."""
    from training.models import settle_batchnorm

    bn = torch.nn.BatchNorm1d(3)
    batches = [torch.full((4, 3), 1.0) + torch.tensor([[-1.0], [1.0], [-1.0], [1.0]]),
               torch.full((4, 3), 3.0) + torch.tensor([[-2.0], [2.0], [-2.0], [2.0]])]
    settle_batchnorm(bn, batches)
    assert torch.allclose(bn.running_mean, torch.full((3,), 2.0))
    # unbiased variances of the two batches: 4/3 and 16/3 -> their average 10/3
    assert torch.allclose(bn.running_var, torch.full((3,), 10 / 3))
    assert bn.momentum is None and bn.num_batches_tracked.item() == 2
