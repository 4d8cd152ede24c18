"""Small synthetic images with known pixels, shared by the data tests."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def image_array(seed: int, h: int = 24, w: int = 20) -> np.ndarray:
    """A reproducible random RGB uint8 image (H, W, 3)."""
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def expected_tensor(arr: np.ndarray) -> np.ndarray:
    """The normalisation computed independently in float64: (x − 127.5)/127.5, (3, H, W)."""
    return ((arr.astype(np.float64) - 127.5) / 127.5).transpose(2, 0, 1)
