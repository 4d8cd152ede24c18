"""OpenAPI for routes whose request is read by a `service.inputs.RequestBody` (multipart or JSON, and
query parameters): FastAPI cannot infer it from a signature, so each route declares it with
`body(reader)`, and `install` adds the request models (`service.schemas.REQUESTS`) to the components.

Every bound shown comes from the request model, the one place that enforces it.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.inputs import RequestBody
from service.schemas import REQUESTS

REF = "#/components/schemas/{model}"


def body(reader: RequestBody) -> dict:
    """`openapi_extra` declaring the request body in both encodings and the query parameters the model takes."""
    props = reader.model.model_json_schema(ref_template=REF)["properties"]
    binary = {"type": "string", "format": "binary"}
    multipart = {n: ({"type": "array", "items": binary} if many else binary) for n, many in reader.files.items()}
    for name, description in reader.text.items():
        multipart[name] = {**_present(props.get(name, {"type": "string"})), "description": description}
    query = [{"name": n, "in": "query", "required": False, "schema": _present(props[n])} for n in reader.query]
    form = {"type": "object", "properties": multipart, "required": list(reader.files)}
    return {"parameters": query, "requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": form},
        "application/json": {"schema": {"$ref": REF.format(model=reader.model.__name__)}},
    }}}


def _present(schema: dict) -> dict:
    """An optional field's schema as sent: without its null branch and default."""
    options = [s for s in schema.get("anyOf", [schema]) if s.get("type") != "null"]
    return {**options[0], **{k: v for k, v in schema.items() if k in ("description", "title")}}


def install(app: FastAPI) -> None:
    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in REQUESTS:
                js = model.model_json_schema(ref_template=REF)
                components.update(js.pop("$defs", {}))
                components[model.__name__] = js
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
