from __future__ import annotations

import numpy as np
import pytest
import torch

from training.data.transforms import (
    AugmentConfig,
    ColorJitter,
    RandomGrayscale,
    RandomHorizontalFlip,
    RandomResizedCrop,
    build_transforms,
)

LUMA = np.array([0.299, 0.587, 0.114])


def image(seed: int = 0, low: float = 0.05, high: float = 0.6) -> torch.Tensor:
    """Normalised (3, 16, 12) image whose [0, 1] values lie in [low, high] (room to brighten without clipping)."""
    g = torch.Generator().manual_seed(seed)
    return (low + (high - low) * torch.rand(3, 16, 12, generator=g)) * 2 - 1


def unit(x: torch.Tensor) -> np.ndarray:
    return (x.double().numpy() + 1) / 2  # back to [0, 1]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_flip_flips():
    x = image()
    out = RandomHorizontalFlip(p=1.0)(x, gen(0))
    np.testing.assert_array_equal(out.numpy(), x.numpy()[:, :, ::-1])
    assert RandomHorizontalFlip(p=0.0)(x, gen(0)) is x


def test_flip_probability():
    flip, x, g = RandomHorizontalFlip(p=0.5), image(), gen(1)
    flips = sum(not torch.equal(flip(x, g), x) for _ in range(400))
    assert 160 < flips < 240  # Binomial(400, 0.5): mean 200, sd 10


def test_identity_config_is_identity():
    pipeline = build_transforms(AugmentConfig.none())
    x = image()
    assert len(pipeline) == 0 and torch.equal(pipeline(x, gen(0)), x)
    assert [type(t) for t in build_transforms(AugmentConfig()).transforms] == [RandomHorizontalFlip]


def test_brightness_scales_every_pixel_by_one_factor():
    x, factors = image(), []
    for seed in range(20):
        out = unit(ColorJitter(brightness=0.4)(x, gen(seed)))
        ratio = out / unit(x)  # no clipping: values ≤ 0.6 · 1.4 < 1
        assert ratio.std() < 1e-6
        factors.append(ratio.mean())
    assert 0.6 - 1e-6 <= min(factors) < 1 < max(factors) <= 1.4 + 1e-6


def fit_factor(out: np.ndarray, x: np.ndarray, anchor) -> float:
    """Least-squares f in out − anchor = f·(x − anchor)."""
    return float(((out - anchor) * (x - anchor)).sum() / ((x - anchor) ** 2).sum())


def test_contrast_blends_with_mean_gray():
    x = unit(image(low=0.2))  # m ≈ 0.4, so f ≤ 1.5 cannot clip
    m = (x * LUMA[:, None, None]).sum(0).mean()  # mean luma, float64
    for seed in range(10):
        out = unit(ColorJitter(contrast=0.5)(image(low=0.2), gen(seed)))
        f = fit_factor(out, x, m)
        assert 0.5 - 1e-6 <= f <= 1.5 + 1e-6
        np.testing.assert_allclose(out, m + f * (x - m), atol=1e-5)


def test_saturation_blends_with_gray_and_keeps_luma():
    x = unit(image(low=0.2))
    gray = (x * LUMA[:, None, None]).sum(0)
    for seed in range(10):
        out = unit(ColorJitter(saturation=0.5)(image(low=0.2), gen(seed)))
        f = fit_factor(out, x, gray)
        assert 0.5 - 1e-6 <= f <= 1.5 + 1e-6
        np.testing.assert_allclose(out, gray + f * (x - gray), atol=1e-5)
        np.testing.assert_allclose((out * LUMA[:, None, None]).sum(0), gray, atol=1e-5)


def test_jitter_stays_in_range():
    x = torch.rand(3, 16, 12, generator=gen(3)) * 2 - 1  # full range: strong jitter must clip
    jitter = ColorJitter(brightness=0.9, contrast=0.9, saturation=0.9)
    for seed in range(20):
        out = jitter(x, gen(seed))
        assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1


def test_grayscale_uses_luma():
    x = image()
    out = RandomGrayscale(p=1.0)(x, gen(0))
    want = (x.double().numpy() * LUMA[:, None, None]).sum(0)  # luma commutes with the normalisation
    for c in range(3):
        np.testing.assert_allclose(out[c].numpy(), want, atol=1e-6)


def test_resized_crop():
    x = image()
    full = RandomResizedCrop(scale=(1.0, 1.0), ratio=(1.0, 1.0))(x, gen(0))
    torch.testing.assert_close(full, x)  # the whole image resized at scale 1 is unchanged
    ramp = torch.linspace(-1, 1, 12).expand(3, 16, 12)  # value = column
    for seed in range(10):
        out = RandomResizedCrop(scale=(0.5, 0.6), ratio=(0.9, 1.1))(ramp, gen(seed))
        assert out.shape == ramp.shape
        assert torch.allclose(out, out[:, :1, :].expand_as(out))  # rows still identical
        assert (out.diff(dim=-1) >= -1e-6).all()  # still increasing left to right
        assert out.max() - out.min() < 2 * 11.5 / 12  # a narrower slice of the ramp, stretched


def test_same_seed_same_output_and_seeds_differ():
    cfg = AugmentConfig(
        hflip=0.5, brightness=0.3, contrast=0.3, saturation=0.3, grayscale=0.2, crop_scale=(0.8, 1.0), crop_ratio=(0.9, 1.1)
    )
    pipeline, x = build_transforms(cfg), image()
    assert len(pipeline) == 4
    outs = [pipeline(x, gen(seed)) for seed in range(5)]
    assert all(torch.equal(pipeline(x, gen(seed)), out) for seed, out in enumerate(outs))
    assert not torch.equal(outs[0], outs[1])


def test_config_validation():
    with pytest.raises(ValueError, match="hflip"):
        AugmentConfig(hflip=1.5)
    with pytest.raises(ValueError, match="crop_scale"):
        AugmentConfig(crop_scale=(0.0, 1.0))
    assert AugmentConfig(crop_scale=[0.9, 1.0]).crop_scale == (0.9, 1.0)  # YAML lists become tuples
