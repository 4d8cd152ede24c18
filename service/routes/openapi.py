"""OpenAPI for routes whose request is read by a `service.inputs.RequestBody` (multipart or JSON, and
query parameters): FastAPI cannot infer it from a signature, so each route declares it with
`body(reader)`, and `install` adds the request models (`service.schemas.REQUESTS`) to the components.

Every bound shown comes from the request model, the one place that enforces it. `install` also adds
the OpenAPI links (LINKS) that say which operation reads or deletes what another created, so clients
and stateful fuzzers (schemathesis) can follow create -> read -> delete.
"""
from __future__ import annotations

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service import schemas
from service.inputs import RequestBody
from service.schemas import REQUESTS

REF = "#/components/schemas/{model}"

Operation = tuple[str, str]  # (method, path) as in the document
# source operation -> link name -> (target operation, its parameters as runtime expressions); links go
# from the 200 response. A target this app does not serve (GET /gallery/{identity} before issue 12) is left out.
LINKS: dict[Operation, dict[str, tuple[Operation, dict[str, str]]]] = {
    ("post", "/templates/{template_id}/frames"): {
        "GetTemplate": (("get", "/templates/{template_id}"), {"path.template_id": "$response.body#/id"}),
        "DeleteTemplate": (("delete", "/templates/{template_id}"), {"path.template_id": "$request.path.template_id"}),
    },
    ("delete", "/templates/{template_id}"): {  # read after delete: 404
        "GetTemplate": (("get", "/templates/{template_id}"), {"path.template_id": "$response.body#/id"}),
    },
    ("post", "/gallery/{identity}"): {
        "GetIdentity": (("get", "/gallery/{identity}"), {"path.identity": "$response.body#/id",
                                                          "header.X-Gallery": "$response.body#/gallery"}),
        "DeleteIdentity": (("delete", "/gallery/{identity}"), {"path.identity": "$response.body#/id",
                                                                "header.X-Gallery": "$response.body#/gallery"}),
        "Search": (("post", "/gallery/search"), {"header.X-Gallery": "$response.body#/gallery"}),
        "GalleryInfo": (("get", "/gallery"), {"header.X-Gallery": "$response.body#/gallery"}),
    },
    ("delete", "/gallery/{identity}"): {  # the identity is gone: 404, and no longer found by search
        "GetIdentity": (("get", "/gallery/{identity}"), {"path.identity": "$response.body#/id",
                                                          "header.X-Gallery": "$request.header.X-Gallery"}),
        "Search": (("post", "/gallery/search"), {"header.X-Gallery": "$request.header.X-Gallery"}),
    },
}


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
            add_links(schema["paths"])
            add_one_of(components)
            faces = getattr(app.state, "faces", None)
            if faces is None:  # not started: the served model's sizes are unknown, so this one is not kept
                return schema
            templates = app.state.templates
            add_sizes(components, {"embedding": faces.card.embedding_size,
                                   "style": templates.fusion.card.style_size if templates else None})
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def add_links(paths: dict) -> None:
    """LINKS into the 200 responses of `paths`, naming each target by its operationId."""
    ids = {(method, path): op["operationId"] for path, ops in paths.items() for method, op in ops.items()}
    for (method, path), links in LINKS.items():
        out = paths[path][method]["responses"]["200"].setdefault("links", {})
        for name, (target, parameters) in links.items():
            if target in ids:
                out[name] = {"operationId": ids[target], "parameters": parameters}


def add_sizes(components: dict, sizes: dict[str, int | None]) -> None:
    """The served model's vector lengths on every array field of that name, in requests and responses:
    requests are validated against them (`service.schemas.Embedding`), so clients and fuzzers can know."""
    for component in components.values():
        for name, prop in component.get("properties", {}).items():
            for option in prop.get("anyOf", [prop]):
                if sizes.get(name) and option.get("type") == "array":
                    option.update(minItems=sizes[name], maxItems=sizes[name])


def add_one_of(components: dict) -> None:
    """A body taking exactly one of some fields (its model's `one_of`) says so: `oneOf` of each one
    required, the fields without their null branch (null is the same as leaving a field out)."""
    for name, component in components.items():
        fields = getattr(getattr(schemas, name, None), "one_of", ())
        for field in fields:
            component["properties"][field] = _present(component["properties"][field])
        if fields:
            component["oneOf"] = [{"required": [field]} for field in fields]
