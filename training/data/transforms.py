"""Image preprocessing (decode → crop → resize → normalise) and training augmentation.

Preprocessing is what every dataset applies to turn stored bytes into the network's input:
RGB, ``size``×``size``, float32 (3, H, W) scaled x' = (x − 127.5)/127.5 (insightface's scaling).

Augmentations act on those normalised tensors and take an optional ``torch.Generator``: given
one they are deterministic; without one they draw from torch's global RNG, which a DataLoader
seeds per worker (base seed + worker id), so ``torch.manual_seed`` makes a run repeatable for a
fixed number of workers. torchvision is deliberately not used.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

Box = tuple[float, float, float, float]  # (left, top, right, bottom), fractions of width/height

# ITU-R BT.601 luma, the weights PIL and torchvision use for grayscale
_LUMA = (0.299, 0.587, 0.114)


def load_rgb(source: str | Path | bytes) -> Image.Image:
    """Decode a file path or encoded bytes (JPEG, PNG, PGM, WebP) to an RGB PIL image."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(source))
    with Image.open(source) as img:
        # grayscale (ORL .pgm), palette and RGBA all become 3-channel RGB
        return img.convert("RGB")


def check_box(crop: Sequence[float] | None) -> Box | None:
    """Validate a relative crop box; None means the whole image."""
    if crop is None:
        return None
    if len(crop) != 4:
        raise ValueError(f"crop must be (left, top, right, bottom), got {crop!r}")
    left, top, right, bottom = (float(v) for v in crop)
    if not (0.0 <= left < right <= 1.0 and 0.0 <= top < bottom <= 1.0):
        raise ValueError(f"crop must satisfy 0 <= left < right <= 1 and 0 <= top < bottom <= 1, got {crop!r}")
    return left, top, right, bottom


def crop_resize(img: Image.Image, size: int | None, crop: Box | None) -> Image.Image:
    """Cut the relative box out of img and resize it to size×size (None keeps the crop's size).

    PIL's ``resize(box=...)`` samples the sub-pixel box directly, so the crop is not rounded to
    whole pixels before resizing, and downscaling is antialiased.
    """
    w, h = img.size
    box = (0.0, 0.0, float(w), float(h)) if crop is None else (crop[0] * w, crop[1] * h, crop[2] * w, crop[3] * h)
    if size is None:
        return img if crop is None else img.crop(tuple(round(v) for v in box))
    return img.resize((size, size), Image.Resampling.BILINEAR, box=box)


def to_tensor(img: Image.Image | np.ndarray) -> torch.Tensor:
    """uint8 RGB (H, W, 3) → float32 (3, H, W) with (x − 127.5)/127.5, so values lie in [−1, 1]."""
    arr = np.asarray(img, dtype=np.float32)  # (H, W, 3)
    return torch.from_numpy((arr - 127.5) / 127.5).permute(2, 0, 1).contiguous()  # (3, H, W)


@dataclass(frozen=True)
class Preprocess:
    """Stored image (path or bytes) → normalised (3, size, size) tensor."""

    size: int | None = 112
    crop: Box | None = None

    def __post_init__(self) -> None:
        if self.size is not None and self.size <= 0:
            raise ValueError(f"size must be positive or None, got {self.size}")
        object.__setattr__(self, "crop", check_box(self.crop))

    def __call__(self, source: str | Path | bytes) -> torch.Tensor:
        return to_tensor(crop_resize(load_rgb(source), self.size, self.crop))


# ---------------------------------------------------------------------------------------------
# Augmentation on normalised (3, H, W) tensors


class Transform(Protocol):
    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor: ...


def _uniform(generator: torch.Generator | None, low: float = 0.0, high: float = 1.0) -> float:
    return low + (high - low) * torch.rand((), generator=generator).item()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """Luma of a (3, H, W) image, shape (1, H, W). The weights sum to 1, so it commutes with the
    affine normalisation and can be taken on normalised values directly."""
    r, g, b = x.unbind(0)
    return (_LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b).unsqueeze(0)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: float) -> torch.Tensor:
    """factor·x + (1 − factor)·other, clamped to the valid [0, 1] range."""
    return (factor * x + (1.0 - factor) * other).clamp(0.0, 1.0)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return x.flip(-1) if _uniform(generator) < self.p else x

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> RandomHorizontalFlip | None:
        return cls(cfg.hflip) if cfg.hflip > 0 else None


class ColorJitter:
    """Brightness, contrast and saturation, each with a factor f drawn from [max(0, 1 − δ), 1 + δ].

    On pixel values x ∈ [0, 1] (applied in this fixed order, clamped after each step):
      brightness  x ← f·x
      contrast    x ← f·x + (1 − f)·mean(gray(x))
      saturation  x ← f·x + (1 − f)·gray(x)
    These are torchvision's definitions; the fixed order keeps the draws reproducible.
    """

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0) -> None:
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation

    @staticmethod
    def _factor(delta: float, generator: torch.Generator | None) -> float:
        return _uniform(generator, max(0.0, 1.0 - delta), 1.0 + delta)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        y = (x + 1.0) / 2.0  # [-1, 1] -> [0, 1]
        if self.brightness > 0:
            y = _blend(y, torch.zeros_like(y), self._factor(self.brightness, generator))
        if self.contrast > 0:
            y = _blend(y, _gray(y).mean(), self._factor(self.contrast, generator))
        if self.saturation > 0:
            y = _blend(y, _gray(y), self._factor(self.saturation, generator))
        return y * 2.0 - 1.0

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> ColorJitter | None:
        if cfg.brightness == cfg.contrast == cfg.saturation == 0:
            return None
        return cls(cfg.brightness, cfg.contrast, cfg.saturation)


class RandomGrayscale:
    def __init__(self, p: float = 0.1) -> None:
        self.p = p

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return _gray(x).expand_as(x).clone() if _uniform(generator) < self.p else x

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> RandomGrayscale | None:
        return cls(cfg.grayscale) if cfg.grayscale > 0 else None


class RandomResizedCrop:
    """Crop a box of area fraction a ∈ scale and aspect ratio r ∈ ratio (log-uniform), at a
    uniform position, and resize it back to the input's size (bilinear).

    Meant for small jitter around an aligned face (e.g. scale (0.9, 1)), not for the aggressive
    crops of generic image classification, which would cut the alignment apart.
    """

    def __init__(self, scale: tuple[float, float] = (0.9, 1.0), ratio: tuple[float, float] = (0.95, 1.05)) -> None:
        self.scale, self.ratio = scale, ratio

    def _box(self, h: int, w: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
        area = _uniform(generator, *self.scale)
        ratio = math.exp(_uniform(generator, math.log(self.ratio[0]), math.log(self.ratio[1])))
        cw = min(w, max(1, round(w * math.sqrt(area * ratio))))
        ch = min(h, max(1, round(h * math.sqrt(area / ratio))))
        top = int(_uniform(generator) * (h - ch + 1))
        left = int(_uniform(generator) * (w - cw + 1))
        return top, left, ch, cw

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        _, h, w = x.shape
        top, left, ch, cw = self._box(h, w, generator)
        patch = x[None, :, top : top + ch, left : left + cw]  # (1, 3, ch, cw)
        return F.interpolate(patch, size=(h, w), mode="bilinear", align_corners=False)[0]  # (3, H, W)

    @classmethod
    def from_config(cls, cfg: AugmentConfig) -> RandomResizedCrop | None:
        if cfg.crop_scale == (1.0, 1.0) and cfg.crop_ratio == (1.0, 1.0):
            return None
        return cls(cfg.crop_scale, cfg.crop_ratio)


class Compose:
    """Apply transforms in order, threading one generator through all of them."""

    def __init__(self, transforms: Sequence[Transform]) -> None:
        self.transforms = list(transforms)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        for t in self.transforms:
            x = t(x, generator)
        return x

    def __len__(self) -> int:
        return len(self.transforms)


@dataclass(frozen=True)
class AugmentConfig:
    """Training augmentation. Every probability/strength 0 (and crop (1, 1)) disables that step;
    the default is insightface's recipe: horizontal flip only."""

    hflip: float = 0.5  # probability of a horizontal flip
    brightness: float = 0.0  # δ: brightness factor drawn from [1 − δ, 1 + δ]
    contrast: float = 0.0  # δ for contrast
    saturation: float = 0.0  # δ for saturation
    grayscale: float = 0.0  # probability of converting to grayscale (kept 3-channel)
    crop_scale: tuple[float, float] = (1.0, 1.0)  # area fraction range of the random resized crop
    crop_ratio: tuple[float, float] = (1.0, 1.0)  # aspect ratio range of the random resized crop

    def __post_init__(self) -> None:
        for name in ("hflip", "grayscale"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"augment.{name} is a probability in [0, 1], got {getattr(self, name)}")
        for name in ("brightness", "contrast", "saturation"):
            if getattr(self, name) < 0:
                raise ValueError(f"augment.{name} must be >= 0, got {getattr(self, name)}")
        # YAML gives lists; keep tuples so the config stays hashable and comparable
        object.__setattr__(self, "crop_scale", tuple(float(v) for v in self.crop_scale))
        object.__setattr__(self, "crop_ratio", tuple(float(v) for v in self.crop_ratio))
        lo, hi = self.crop_scale
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"augment.crop_scale must satisfy 0 < low <= high <= 1, got {self.crop_scale}")
        lo, hi = self.crop_ratio
        if not 0.0 < lo <= hi:
            raise ValueError(f"augment.crop_ratio must satisfy 0 < low <= high, got {self.crop_ratio}")

    @classmethod
    def none(cls) -> AugmentConfig:
        """No augmentation at all (evaluation, feature extraction)."""
        return cls(hflip=0.0)


# Pipeline order: geometry first, then colour. Each entry builds itself from the config or opts out.
_PIPELINE = (RandomResizedCrop, RandomHorizontalFlip, ColorJitter, RandomGrayscale)


def build_transforms(cfg: AugmentConfig) -> Compose:
    """The augmentation pipeline the config asks for (an empty Compose is the identity)."""
    steps = [step.from_config(cfg) for step in _PIPELINE]
    return Compose([s for s in steps if s is not None])
