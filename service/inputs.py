"""Request bodies -> image bytes and embeddings: multipart files or JSON base64, as the contract says.

Both forms are read here so routes stay thin; every malformed body becomes one of the error
table's exceptions (415 for another content type, 422 for a bad field, 413 for too many images).
"""
from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.schemas import (
    EmbedRequest,
    FramesRequest,
    GalleryEnrolRequest,
    GallerySearchRequest,
    VerifyRequest,
    VerifySide,
)

MULTIPART, JSON, FORM = "multipart/form-data", "application/json", "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Side:
    """One side of /verify: image bytes or a client's embedding."""

    label: str
    image: bytes | None = None
    embedding: np.ndarray | None = None


@dataclass(frozen=True)
class Frame:
    """One frame of a request: image bytes, or a raw embedding (D,) with its style statistics (S,)."""

    index: int
    frame_id: str | None = None
    image: bytes | None = None
    raw: np.ndarray | None = None
    style: np.ndarray | None = None


def content_type(request: Request, allowed: tuple[str, ...] = (MULTIPART, JSON)) -> str:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in allowed:
        raise UnsupportedMediaType(f"send {' or '.join(allowed)}, not {kind or 'no content type'}")
    return kind


async def read_images(request: Request, max_images: int) -> list[bytes]:
    """The request's images (multipart field `images`, or JSON {"images": [{"data": base64}]})."""
    if content_type(request) == MULTIPART:
        return await _form_images(await _form(request, max_files=max_images, max_fields=16), max_images)
    return _b64_images(_parse(await request.body(), EmbedRequest).images, max_images)


async def read_verify(request: Request) -> tuple[Side, Side, float | None]:
    """Sides a and b of /verify and the far, if sent: JSON objects, or form fields holding files or
    JSON-encoded embeddings (multipart; url-encoded when both sides are embeddings)."""
    if content_type(request, (MULTIPART, JSON, FORM)) == JSON:
        body = _parse(await request.body(), VerifyRequest)
        return _side("a", body.a), _side("b", body.b), body.far
    form = await _form(request, max_files=2, max_fields=4)
    sides = []
    for label in ("a", "b"):
        value = form.get(label)
        if value is None:
            raise InvalidInput(f"missing field '{label}': an image file or a JSON embedding")
        if isinstance(value, UploadFile):
            sides.append(Side(label, image=await _file_bytes(value, label)))
        else:
            sides.append(Side(label, embedding=_embedding(_json_list(value, label), label)))
    far = form.get("far")
    return sides[0], sides[1], _float(far, "far") if far is not None else None


async def _form(request: Request, max_files: int, max_fields: int):
    """The multipart form; too many files is a 413, any other malformed form a 422 (Starlette's own checks)."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise PayloadTooLarge(f"too many files in one request; the limit is {max_files}") from None
        raise InvalidInput(f"malformed multipart body: {exc.detail}") from None


async def read_frames(request: Request, max_frames: int, embedding_size: int, style_size: int) -> list[Frame]:
    """Frames for /templates/{id}/frames: multipart `images` (+ `frame_ids`, one per file, in order) or JSON `frames`."""
    if content_type(request) == MULTIPART:
        form = await _form(request, max_files=max_frames, max_fields=max_frames + 16)
        images = [await _file_bytes(f, "images") for f in form.getlist("images")]
        ids = [str(v) for v in form.getlist("frame_ids")]
        if not images:
            raise InvalidInput("no frames: send one or more files in the multipart field 'images'")
        if ids and len(ids) != len(images):
            raise InvalidInput(f"{len(ids)} frame_ids for {len(images)} images: send one per image, in order, or none")
        _check_count(len(images), max_frames)
        return [Frame(i, ids[i] if ids else None, image=data) for i, data in enumerate(images)]
    body = _parse(await request.body(), FramesRequest)
    _check_count(len(body.frames), max_frames)
    frames = []
    for i, f in enumerate(body.frames):
        if f.data is not None:
            frames.append(Frame(i, f.frame_id, image=b64decode(f.data, f"frames[{i}]")))
        else:
            raw, style = parse_precomputed(i, f.embedding, f.magnitude, f.style, embedding_size, style_size)
            frames.append(Frame(i, f.frame_id, raw=raw, style=style))
    return frames


@dataclass(frozen=True)
class GalleryInput:
    images: list[bytes] | None = None
    embedding: list[float] | None = None
    template_id: str | None = None
    top_k: int | None = None
    far: float | None = None


async def read_gallery(request: Request, max_images: int, search: bool) -> GalleryInput:
    """/gallery bodies: multipart `images` (search: + `top_k`, `far` fields), or the JSON request models."""
    if content_type(request) == MULTIPART:
        form = await _form(request, max_files=max_images, max_fields=16)
        images = await _form_images(form, max_images)
        top_k, far = form.get("top_k"), form.get("far")
        return GalleryInput(images=images, top_k=int(_float(top_k, "top_k")) if top_k else None,
                            far=_float(far, "far") if far else None)
    body = _parse(await request.body(), GallerySearchRequest if search else GalleryEnrolRequest)
    images = None if body.images is None else _b64_images(body.images, max_images)
    if search:
        return GalleryInput(images=images, embedding=body.embedding, top_k=body.top_k, far=body.far)
    return GalleryInput(images=images, embedding=body.embedding, template_id=body.template_id)


def b64decode(text: str, label: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidInput(f"{label}: 'data' is not valid base64") from None
    if not data:
        raise InvalidInput(f"{label}: empty image")
    return data


def _side(label: str, side: VerifySide) -> Side:
    if side.data is not None:
        return Side(label, image=b64decode(side.data, label))
    return Side(label, embedding=_embedding(side.embedding, label))


def _embedding(values, label: str) -> np.ndarray:
    vector = np.asarray(values, dtype=np.float64)
    if vector.ndim != 1 or not np.isfinite(vector).all() or not np.any(vector):
        raise InvalidInput(f"{label}: an embedding must be a non-zero list of finite numbers")
    return vector


def _json_list(text: str, label: str) -> list:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise InvalidInput(f"{label}: a text field must hold a JSON list of numbers (an embedding)") from None
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise InvalidInput(f"{label}: a text field must hold a JSON list of numbers (an embedding)")
    return value


def _float(text, label: str) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        raise InvalidInput(f"{label}: not a number") from None


async def _file_bytes(value, label: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise InvalidInput(f"field '{label}' must be a file")
    data = await value.read()
    if not data:
        raise InvalidInput(f"field '{label}': empty file")
    return data


def _parse(raw: bytes, model: type[BaseModel]):
    try:
        return model.model_validate_json(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "body"
        raise InvalidInput(f"{where}: {first.get('msg', 'invalid')}") from None


async def _form_images(form, max_images: int) -> list[bytes]:
    images = [await _file_bytes(f, "images") for f in form.getlist("images")]
    if not images:
        raise InvalidInput("no images: send one or more files in the multipart field 'images'")
    _check_count(len(images), max_images)
    return images


def _b64_images(items, max_images: int) -> list[bytes]:
    _check_count(len(items), max_images)
    return [b64decode(item.data, f"images[{i}]") for i, item in enumerate(items)]


def _check_count(n: int, max_images: int) -> None:
    if n > max_images:
        raise PayloadTooLarge(f"{n} images in one request; the limit is {max_images}")


def parse_precomputed(index: int, embedding, magnitude, style, card_d: int, style_size: int) -> tuple[np.ndarray, np.ndarray]:
    """A client's precomputed frame -> (raw embedding (D,), style (S,)); the magnitude restores a unit embedding's scale."""
    e = np.asarray(embedding, dtype=np.float64)
    st = np.asarray(style, dtype=np.float64)
    if e.shape != (card_d,) or not np.isfinite(e).all() or not np.any(e):
        raise InvalidInput(f"frames[{index}]: embedding must be {card_d} finite numbers, not all zero")
    if st.shape != (style_size,) or not np.isfinite(st).all():
        raise InvalidInput(f"frames[{index}]: style must be {style_size} finite numbers (the model's style statistics)")
    if magnitude is not None:
        if not magnitude > 0:
            raise InvalidInput(f"frames[{index}]: magnitude must be positive")
        e = e / np.linalg.norm(e) * magnitude
    return e, st
