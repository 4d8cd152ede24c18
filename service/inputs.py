"""Requests -> their one validated model (`service.schemas`), whatever the encoding.

A JSON body, a multipart form (files as bytes) and the query parameters the contract has are read
into the same fields and validated once, by the route's model, which holds every bound. Anything
malformed becomes one of the error table's exceptions: 415 for another content type, 413 for too
many images, 422 `invalid_input` naming the field.
"""
# no `from __future__ import annotations`: FastAPI reads RequestBody.__call__'s annotations at run time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
from pydantic import BaseModel, ValidationError
from pydantic_core import from_json
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.errors import InvalidInput, PayloadTooLarge, UnsupportedMediaType
from service.schemas import FramesRequest

MULTIPART, JSON, FORM = "multipart/form-data", "application/json", "application/x-www-form-urlencoded"


@dataclass(frozen=True)
class Frame:
    """One frame of a request: image bytes, or a raw embedding (D,) with its style statistics (S,)."""

    index: int
    frame_id: str | None = None
    image: bytes | None = None
    raw: np.ndarray | None = None
    style: np.ndarray | None = None


@dataclass(frozen=True, eq=False)  # eq=False: hashed by identity, as FastAPI's dependency cache needs
class RequestBody:
    """A route's request model as a dependency: `Annotated[Model, Depends(RequestBody(Model, ...))]`.

    `files` names the multipart file fields (name -> several files?), `text` the multipart text
    fields worth documenting, `query` the model's fields that may come as query parameters instead.
    """

    model: type[BaseModel]
    files: dict[str, bool]
    text: dict[str, str] = field(default_factory=dict)
    query: tuple[str, ...] = ()
    counted: str | None = "images"  # the field whose items count against max_images (413)
    max_files: int | None = None  # None: the settings' max_images
    encodings: tuple[str, ...] = (MULTIPART, JSON)
    from_form: Callable[[dict], dict] | None = None  # a form's fields -> the model's, where they differ

    async def __call__(self, request: Request) -> BaseModel:
        state = request.app.state
        max_images = state.settings.max_images
        if content_type(request, self.encodings) == JSON:
            fields = _json(await request.body())
        else:
            max_files = self.max_files or max_images
            form = await _form(request, max_files=max_files, max_fields=max_files + 16)
            fields = await _form_fields(form, self.files)
            fields = self.from_form(fields) if self.from_form else fields
        if isinstance(fields, dict):
            _add_query(fields, request, self.query)
        templates = state.templates
        context = {"embedding_size": state.faces.card.embedding_size,
                   "style_size": templates.fusion.card.style_size if templates else None}
        body = validate(self.model, fields, context)
        n = len(getattr(body, self.counted) or []) if self.counted else 0
        if n > max_images:
            raise PayloadTooLarge(f"{n} images in one request; the limit is {max_images}")
        return body


def content_type(request: Request, allowed: tuple[str, ...] = (MULTIPART, JSON)) -> str:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind not in allowed:
        raise UnsupportedMediaType(f"send {' or '.join(allowed)}, not {kind or 'no content type'}")
    return kind


def validate(model: type[BaseModel], fields, context: dict) -> BaseModel:
    """The model from its fields; a validation error is a 422 naming the field (the first three, if several)."""
    try:
        return model.model_validate(fields, context=context)
    except ValidationError as exc:
        parts = []
        for err in exc.errors()[:3]:
            where = ".".join(str(p) for p in err.get("loc", ())) or "body"
            parts.append(f"{where}: {err.get('msg', 'invalid').removeprefix('Value error, ')}")
        raise InvalidInput("; ".join(parts)) from None


def frames(body: FramesRequest) -> list[Frame]:
    """/templates/{id}/frames' frames; a precomputed embedding is scaled back to its raw magnitude."""
    out = []
    for i, f in enumerate(body.frames):
        if f.data is not None:
            out.append(Frame(i, f.frame_id, image=f.data))
        else:
            raw = f.embedding.unit * (f.embedding.norm if f.magnitude is None else f.magnitude)
            out.append(Frame(i, f.frame_id, raw=raw, style=np.asarray(f.style, dtype=np.float64)))
    return out


def frames_form(fields: dict) -> dict:
    """Multipart `images` (+ `frame_ids`, one per file, in order) -> FramesRequest's `frames`."""
    images, ids = fields.pop("images", []), fields.pop("frame_ids", None)
    ids = [ids] if isinstance(ids, str) else ids
    if ids is not None and len(ids) != len(images):
        raise InvalidInput(f"{len(ids)} frame_ids for {len(images)} images: send one per image, in order, or none")
    return {**fields, "frames": [{**image, "frame_id": ids[i] if ids else None} for i, image in enumerate(images)]}


def _json(raw: bytes):
    try:
        return from_json(raw)  # bounded nesting: deeply nested JSON is an error, not a RecursionError
    except ValueError as exc:
        raise InvalidInput(f"body: malformed JSON ({exc})") from None


def _add_query(fields: dict, request: Request, names: tuple[str, ...]) -> None:
    for name in names:
        values = request.query_params.getlist(name)
        if not values:
            continue
        if name in fields:
            raise InvalidInput(f"{name}: given both in the query and the body; send it once")
        fields[name] = values[0] if len(values) == 1 else values


async def _form(request: Request, max_files: int, max_fields: int) -> FormData:
    """The form; too many files is a 413, any other malformed form a 422 (Starlette's own checks)."""
    try:
        return await request.form(max_files=max_files, max_fields=max_fields)
    except HTTPException as exc:
        if "Too many files" in str(exc.detail):
            raise PayloadTooLarge(f"too many files in one request; the limit is {max_files}") from None
        raise InvalidInput(f"malformed multipart body: {exc.detail}") from None


async def _form_fields(form: FormData, files: dict[str, bool]) -> dict:
    """A form as the model's fields: a file field of several files -> [{"data": bytes}], of one file ->
    {"data": bytes} or, sent as text, {"embedding": its JSON list}; any other field as its text."""
    fields = {}
    for name in dict.fromkeys(form.keys()):
        values = form.getlist(name)
        if name in files and files[name]:
            fields[name] = [{"data": await _file_bytes(v, name)} for v in values]
        elif len(values) > 1:
            fields[name] = [_text(v, name) for v in values]
        elif name in files:
            value = values[0]
            fields[name] = ({"data": await _file_bytes(value, name)} if isinstance(value, UploadFile)
                            else {"embedding": _json_text(value, name)})
        else:
            fields[name] = _text(values[0], name)
    return fields


async def _file_bytes(value, name: str) -> bytes:
    if not isinstance(value, UploadFile):
        raise InvalidInput(f"{name}: must be a file")
    return await value.read()


def _text(value, name: str) -> str:
    if isinstance(value, UploadFile):
        raise InvalidInput(f"{name}: must be a text field, not a file")
    return value


def _json_text(text: str, name: str):
    try:
        return from_json(text)
    except ValueError:
        raise InvalidInput(f"{name}: a text field must hold a JSON list of numbers (an embedding)") from None
