"""Untrusted bytes -> an RGB photo, or the one error that says why not.

The format is sniffed from the first bytes (JPEG, PNG and WebP only: 415 otherwise, whatever
the client claims); the size is read from the header and refused before any pixel is decoded
when it exceeds the limit (a decompression bomb is a small file with a huge header size);
Pillow's own bomb check is made an error too; a truncated or corrupt file is a 422. EXIF
orientation is applied, so a phone photo's face is upright for the detector.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from service.errors import ImageTooLarge, UndecodableImage, UnsupportedMediaType

FORMATS = ("JPEG", "PNG", "WEBP")


def sniff(data: bytes) -> str | None:
    """The format by magic number: "JPEG", "PNG", "WEBP", or None."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    return None


def decode(data: bytes, max_pixels: int, label: str = "image") -> np.ndarray:
    """(H, W, 3) uint8 RGB of a JPEG/PNG/WebP file; `label` names the image in error messages."""
    kind = sniff(data)
    if kind is None:
        raise UnsupportedMediaType(f"{label}: not a JPEG, PNG or WebP file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=[kind]) as img:
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageTooLarge(f"{label}: {w}×{h} pixels exceeds the limit of {max_pixels}")
                img.load()
                img = ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge(f"{label}: refused as a decompression bomb ({exc})") from None
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as exc:
            raise UndecodableImage(f"{label}: the {kind} data could not be decoded ({type(exc).__name__})") from None
    return np.ascontiguousarray(np.asarray(rgb, dtype=np.uint8))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")  # transparent background -> white
    if img.mode.startswith("I;16") or img.mode == "I":
        arr = np.asarray(img, dtype=np.uint32) >> 8  # 16-bit grey -> 8-bit
        return Image.fromarray(arr.astype(np.uint8)).convert("RGB")
    return img.convert("RGB")
