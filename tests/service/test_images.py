"""Decoding untrusted image bytes: formats, bombs, corruption, orientation, modes."""
from __future__ import annotations


import numpy as np
import pytest
from PIL import Image

from service.errors import ImageTooLarge, UndecodableImage, UnsupportedMediaType
from service.images import decode, sniff
from tests.helpers import encode

LIMIT = 40_000_000


def _gradient(w: int = 64, h: int = 48) -> Image.Image:
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 4 % 256, y * 5 % 256, (x + y) % 256], -1).astype(np.uint8))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_the_three_formats_decode_to_rgb(fmt):
    img = _gradient()
    out = decode(encode(img, fmt, **({"lossless": True} if fmt == "WEBP" else {})), LIMIT)
    assert out.shape == (48, 64, 3) and out.dtype == np.uint8
    tolerance = 12 if fmt == "JPEG" else 0
    assert np.abs(out.astype(int) - np.asarray(img, dtype=int)).mean() <= tolerance
    assert sniff(encode(img, fmt)) == fmt


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "TIFF"])
def test_other_formats_are_415(fmt):
    with pytest.raises(UnsupportedMediaType):
        decode(encode(_gradient(), fmt), LIMIT)


def test_garbage_and_truncated_files_are_undecodable():
    good = encode(_gradient(256, 256), "JPEG")
    with pytest.raises(UnsupportedMediaType):
        decode(b"hello world", LIMIT)
    with pytest.raises(UndecodableImage):
        decode(good[: len(good) // 2], LIMIT)  # a JPEG cut in half
    png = encode(_gradient(), "PNG")
    with pytest.raises(UndecodableImage):
        decode(png[:40] + b"\x00" * 20 + png[60:], LIMIT)  # a corrupted chunk


def test_a_decompression_bomb_is_refused_before_decoding():
    bomb = encode(Image.new("1", (30_000, 30_000)), "PNG")  # 900 megapixels in a small file
    assert len(bomb) < 200_000
    with pytest.raises(ImageTooLarge, match="900000000"):
        decode(bomb, LIMIT)
    with pytest.raises(ImageTooLarge):
        decode(encode(_gradient(100, 100), "PNG"), max_pixels=9_999)


def test_exif_orientation_is_applied():
    img = _gradient(64, 48)
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    out = decode(encode(img, "JPEG", exif=exif.tobytes(), quality=95), LIMIT)
    assert out.shape == (64, 48, 3)


def test_alpha_grey_and_16_bit_images_become_rgb():
    rgba = Image.new("RGBA", (10, 10), (255, 0, 0, 0))  # fully transparent red
    assert (decode(encode(rgba, "PNG"), LIMIT) == 255).all()  # composited on white
    grey = Image.fromarray(np.full((8, 8), 77, np.uint8))
    assert (decode(encode(grey, "PNG"), LIMIT) == 77).all()
    deep = Image.fromarray(np.full((8, 8), 0x4D00, np.uint16))
    assert (decode(encode(deep, "PNG"), LIMIT) == 0x4D).all()
