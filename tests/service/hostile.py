"""A corpus of hostile image files, generated in code (deterministic, nothing read from disk).

Each `Case` is the bytes a hostile or careless client might send as an image and what the service
must answer: the documented 4xx with its error code, or 200 for a valid image (no face in these).
Bombs are written by hand (a declared size, little data) so building the corpus costs no memory.
"""
from __future__ import annotations

import io
import struct
import zipfile
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image
from tests.helpers import encode

OK, TOO_LARGE, UNDECODABLE, UNSUPPORTED = ("ok", 200), ("image_too_large", 422), ("undecodable_image", 422), \
    ("unsupported_media_type", 415)


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    code: str  # "ok" for a 200
    status: int


def _texture(w: int = 96, h: int = 72) -> Image.Image:
    """A faceless but non-trivial RGB picture."""
    y, x = np.mgrid[0:h, 0:w]
    return Image.fromarray(np.stack([x * 7 % 256, y * 5 % 256, (x * y) % 256], -1).astype(np.uint8))


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _png(width: int, height: int, idat: bytes, bit_depth: int = 8, colour: int = 0, extra: bytes = b"") -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + extra + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def png_zero_bomb(side: int = 30_000) -> bytes:
    """side × side 1-bit zeros (900 megapixels for 30,000): about 100 KB, compressed row by row."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    z = zlib.compressobj(9)
    parts = [z.compress(row * 1000) for _ in range(side // 1000)] + [z.compress(row * (side % 1000)), z.flush()]
    return _png(side, side, b"".join(parts), bit_depth=1)


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small real JPEG whose SOF header claims width × height."""
    data = bytearray(encode(_texture(), "JPEG", quality=80))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp_declaring(width: int, height: int) -> bytes:
    """A small lossless WebP whose VP8L header claims width × height (each at most 16384)."""
    data = bytearray(encode(_texture(), "WEBP", lossless=True))
    at = data.index(b"VP8L") + 8
    assert data[at] == 0x2F  # the VP8L signature byte
    bits = struct.unpack("<I", data[at + 1:at + 5])[0] & ~((1 << 28) - 1)  # keep alpha + version bits
    data[at + 1:at + 5] = struct.pack("<I", bits | (width - 1) | ((height - 1) << 14))
    return bytes(data)


def _exif_orientation(value: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = value
    return encode(_texture(), "JPEG", exif=exif.tobytes())


def _itxt(text_bytes: int, compressed: bool) -> bytes:
    """A real PNG with an iTXt chunk of `text_bytes` bytes of text (zlib-compressed: a text bomb)."""
    block = b"A" * (1 << 20)
    if compressed:  # streamed: the text never exists whole in memory
        z = zlib.compressobj(9)
        body = b"".join(z.compress(block) for _ in range(text_bytes >> 20)) + z.flush()
    else:
        body = block * (text_bytes >> 20)
    itxt = _chunk(b"iTXt", b"Comment\x00" + bytes([int(compressed), 0]) + b"\x00\x00" + body)
    png = encode(_texture(), "PNG")
    return png[:33] + itxt + png[33:]  # right after IHDR (8 signature + 25 IHDR bytes)


def _animated(fmt: str) -> bytes:
    frames = [_texture().rotate(k * 90) for k in range(3)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **kw)


def _polyglot() -> bytes:
    """The PNG signature followed by a zip archive (what a file that is 'both' looks like to a sniffer)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("payload.txt", "not an image")
    return b"\x89PNG\r\n\x1a\n" + buf.getvalue()


def _cut(data: bytes, keep: float = 0.5) -> bytes:
    return data[:int(len(data) * keep)]


def corpus() -> list[Case]:
    jpeg, png = encode(_texture(), "JPEG"), encode(_texture(), "PNG")
    webp = encode(_texture(), "WEBP", quality=80)
    gray16 = Image.fromarray((np.arange(96 * 72, dtype=np.uint16).reshape(72, 96) * 9).astype(np.uint16))
    cases = [
        ("png bomb 30000x30000 zeros", png_zero_bomb(), *TOO_LARGE),
        ("png huge IHDR tiny IDAT", _png(65_535, 65_535, zlib.compress(b"\x00" * 64)), *TOO_LARGE),
        ("webp bomb 16384x16384", _webp_declaring(16_384, 16_384), *TOO_LARGE),
        ("jpeg declaring 65500x65500", _jpeg_declaring(65_500, 65_500), *TOO_LARGE),
        ("truncated jpeg", _cut(jpeg), *UNDECODABLE),
        ("truncated png", _cut(png), *UNDECODABLE),
        ("truncated webp", _cut(webp), *UNDECODABLE),
        ("webp header only", webp[:20], *UNDECODABLE),
        ("wrong magic (jpeg body)", b"\x00\x00\x00" + jpeg[3:], *UNSUPPORTED),
        ("gif", encode(_texture(), "GIF"), *UNSUPPORTED),
        ("tiff", encode(_texture(), "TIFF"), *UNSUPPORTED),
        ("bmp", encode(_texture(), "BMP"), *UNSUPPORTED),
        ("svg", b'<svg xmlns="http://www.w3.org/2000/svg" width="9e9" height="9e9"><rect/></svg>', *UNSUPPORTED),
        ("heic-like header", b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64, *UNSUPPORTED),
        ("one byte", b"\xff", *UNSUPPORTED),
        ("text file", b"hello, this is not an image\n" * 20, *UNSUPPORTED),
        ("polyglot png header + zip", _polyglot(), *UNDECODABLE),
        ("jpeg exif orientation 9", _exif_orientation(9), *OK),
        ("jpeg exif orientation 65535", _exif_orientation(65_535), *OK),
        ("jpeg garbage exif", jpeg[:2] + b"\xff\xe1\x00\x20Exif\x00\x00" + b"\xa5" * 24 + jpeg[2:], *OK),
        ("png 16-bit grey", encode(gray16, "PNG"), *OK),
        ("jpeg cmyk", encode(_texture().convert("CMYK"), "JPEG"), *OK),
        ("png palette with transparency", encode(_texture().convert("P"), "PNG", transparency=0), *OK),
        ("png LA", encode(_texture().convert("LA"), "PNG"), *OK),
        ("png 1x1", encode(Image.new("RGB", (1, 1), (200, 150, 120)), "PNG"), *OK),
        ("jpeg 1x1", encode(Image.new("RGB", (1, 1), (200, 150, 120)), "JPEG"), *OK),
        ("animated webp", _animated("WEBP"), *OK),
        ("apng", _animated("PNG"), *OK),
        ("png 2 MB iTXt", _itxt(2 << 20, compressed=False), *OK),
        ("png iTXt bomb (256 MB of text)", _itxt(256 << 20, compressed=True), *UNDECODABLE),
    ]
    return [Case(*c) for c in cases]
