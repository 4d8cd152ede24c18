"""OpenAPI for routes whose body is either multipart files or JSON (both read by `service.inputs`).

FastAPI cannot infer such a body from a signature, so routes declare it with `body(...)` and
`install` adds the JSON models to the document's components.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

REF = "#/components/schemas/{model}"
_MODELS: dict[str, type[BaseModel]] = {}


def body(json_model: type[BaseModel], multipart: dict) -> dict:
    """`openapi_extra` declaring both content types of a request body."""
    _MODELS[json_model.__name__] = json_model
    return {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", **multipart}},
        "application/json": {"schema": {"$ref": REF.format(model=json_model.__name__)}},
    }}}


def fields(files: dict[str, bool], text: dict[str, str] | None = None, required: tuple[str, ...] = ()) -> dict:
    """A multipart schema: file fields (name -> several files?) and text fields (name -> description)."""
    binary = {"type": "string", "format": "binary"}
    props = {n: ({"type": "array", "items": binary} if many else binary) for n, many in files.items()}
    props.update({n: {"type": "string", "description": d} for n, d in (text or {}).items()})
    return {"properties": props, "required": list(required or files)}


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _MODELS.items():
                js = model.model_json_schema(ref_template=REF)
                components.update(js.pop("$defs", {}))
                components[name] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
