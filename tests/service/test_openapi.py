"""The OpenAPI document's links (issue 11.8): each names a served operation and fills its parameters
from what the source operation really has."""
from __future__ import annotations

from service.routes.openapi import LINKS

# create -> read -> delete of templates and gallery identities
EXPECTED = {
    ("post", "/templates/{template_id}/frames", "GetTemplate"),
    ("post", "/templates/{template_id}/frames", "DeleteTemplate"),
    ("delete", "/templates/{template_id}", "GetTemplate"),
    ("post", "/gallery/{identity}", "DeleteIdentity"),
    ("post", "/gallery/{identity}", "Search"),
    ("delete", "/gallery/{identity}", "Search"),
}


def _resolve(spec: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].rsplit("/", 1)[-1]]
    return schema


def _source_has(spec: dict, op: dict, status: str, expression: str) -> bool:
    """Whether the runtime expression points at a parameter or response field the source operation has."""
    if expression.startswith("$response.body#/"):
        body = op["responses"][status]["content"]["application/json"]["schema"]
        return expression.removeprefix("$response.body#/") in _resolve(spec, body)["properties"]
    _, where, name = expression.split(".", 2)  # $request.path.template_id
    return {"in": where, "name": name} in [{"in": p["in"], "name": p["name"]} for p in op.get("parameters", [])]


def test_links_resolve_to_operations_and_their_parameters(client):
    spec = client.get("/openapi.json").json()
    by_id = {op["operationId"]: op for ops in spec["paths"].values() for op in ops.values()}
    found = set()
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            for status, response in op["responses"].items():
                for name, link in response.get("links", {}).items():
                    target = by_id[link["operationId"]]
                    params = {(p["in"], p["name"]) for p in target.get("parameters", [])}
                    given = {tuple(key.split(".", 1)) for key in link["parameters"]}
                    assert given <= params, (path, name)
                    assert {p for p in params if p[0] == "path"} <= given, (path, name)  # every path parameter
                    for expression in link["parameters"].values():
                        assert _source_has(spec, op, status, expression), (path, name, expression)
                    found.add((method, path, name))
    assert EXPECTED <= found
    served = {(method, path) for path, ops in spec["paths"].items() for method in ops}
    assert found == {(*source, name) for source, links in LINKS.items() for name, (target, _) in links.items()
                     if target in served}  # only a target that is not served is left out


def test_bodies_state_exactly_one_of_and_the_served_sizes(client):
    """What validation enforces beyond the field types, so a client (or a fuzzer) can send a valid body."""
    components = client.get("/openapi.json").json()["components"]["schemas"]
    search = components["GallerySearchRequest"]
    assert search["oneOf"] == [{"required": ["images"]}, {"required": ["embedding"]}]
    assert "anyOf" not in search["properties"]["images"]  # null is leaving it out, not a choice
    size = client.app.state.faces.card.embedding_size
    assert search["properties"]["embedding"]["minItems"] == search["properties"]["embedding"]["maxItems"] == size
    assert components["FaceOut"]["properties"]["embedding"]["maxItems"] == size
    style = client.app.state.templates.fusion.card.style_size
    assert components["FrameData"]["properties"]["style"]["anyOf"][0]["minItems"] == style
    r = client.post("/gallery/search", json={"embedding": [0.5] * size})
    assert r.status_code == 200, r.text  # the documented shape is accepted
