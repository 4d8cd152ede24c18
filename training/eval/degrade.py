"""Controlled image degradations: blur, low resolution, occlusion, noise (numpy + PIL only).

Used to show that a quality score falls as faces get worse, and to build sets that mix good and
poor frames (template fusion). Each degradation takes an RGB uint8 array and a strength and is
deterministic given `seed`.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
from PIL import Image, ImageFilter

from engines.registry import Registry

DEGRADATIONS: Registry = Registry("degradation")


@DEGRADATIONS.register("blur")
def blur(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Gaussian blur with standard deviation `sigma` pixels."""
    return np.asarray(Image.fromarray(img).filter(ImageFilter.GaussianBlur(radius=sigma)))


@DEGRADATIONS.register("lowres")
def lowres(img: np.ndarray, factor: float, seed: int = 0) -> np.ndarray:
    """Down-sample by `factor` (≥ 1) and back up: the detail of a face `factor` times smaller."""
    h, w = img.shape[:2]
    small = Image.fromarray(img).resize((max(1, round(w / factor)), max(1, round(h / factor))), Image.Resampling.BILINEAR)
    return np.asarray(small.resize((w, h), Image.Resampling.BILINEAR))


@DEGRADATIONS.register("occlude")
def occlude(img: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """A grey square covering `fraction` of the image area, at a random place inside the central half."""
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    side = int(round(np.sqrt(fraction * h * w)))
    if side == 0:
        return img.copy()
    y = int(rng.integers(h // 4, max(h // 4 + 1, 3 * h // 4 - side // 2)))
    x = int(rng.integers(w // 4, max(w // 4 + 1, 3 * w // 4 - side // 2)))
    out = img.copy()
    out[max(0, y - side // 2) : y + side // 2, max(0, x - side // 2) : x + side // 2] = 128
    return out


@DEGRADATIONS.register("noise")
def noise(img: np.ndarray, sigma: float, seed: int = 0) -> np.ndarray:
    """Additive Gaussian noise of standard deviation `sigma` grey levels."""
    rng = np.random.default_rng(seed)
    return np.clip(img.astype(np.float32) + rng.normal(0, sigma, img.shape), 0, 255).astype(np.uint8)


def degrade(img: np.ndarray, kind: str, strength: float, seed: int = 0) -> np.ndarray:
    fn: Callable[..., np.ndarray] = DEGRADATIONS.get(kind)
    return fn(img, strength, seed=seed)
