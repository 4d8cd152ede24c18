"""One validation per request, whatever its encoding: a bad value is the same 422 `invalid_input`,
naming the field, as a multipart field, a JSON member or a query parameter (issue 11.1: multipart
`top_k=nan` was a 500 and `far=0` silently fell back to the default)."""
from __future__ import annotations

import io
import json
import re

import pytest
from PIL import Image

D = 128  # the default model's embedding size
EMB = [1.0] * D
TOP_K = ["nan", "inf", "1e400", "-5", "0"]
FAR = ["0", "-1", "nan", "2"]
JSON_NUMBER = {"nan": "NaN", "inf": "Infinity"}  # how JSON spells what a form sends as text


def _jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (120, 90, 60)).save(buf, format="JPEG")
    return buf.getvalue()


def _tid(settings) -> str:
    return f"{settings.key_prefix.strip(':')}.validation"


def _json(client, path: str, body: str, **kwargs):
    return client.post(path, content=body.encode(), headers={"content-type": "application/json"}, **kwargs)


def _invalid(r, field: str) -> str:
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "invalid_input" and re.match(rf"{re.escape(field)}[.:]", error["message"]), error
    return error["message"]


def _sent_every_way(client, path: str, field: str, value: str, json_body: str) -> None:
    """`field=value` as a multipart field, as a query parameter and as a JSON member: the same 422."""
    files = {"a": _jpeg(), "b": _jpeg()} if path == "/verify" else [("images", _jpeg())]
    _invalid(client.post(path, files=files, data={field: value}), field)
    _invalid(client.post(path, files=files, params={field: value}), field)
    _invalid(_json(client, path, f'{json_body[:-1]}, "{field}": {JSON_NUMBER.get(value, value)}}}'), field)


@pytest.mark.parametrize("value", TOP_K)
def test_bad_top_k_is_422_in_every_encoding(client, value):
    _sent_every_way(client, "/gallery/search", "top_k", value, json.dumps({"embedding": EMB}))
    assert client.get("/readyz").status_code == 200


@pytest.mark.parametrize("path", ["/gallery/search", "/verify"])
@pytest.mark.parametrize("value", FAR)
def test_bad_far_is_422_in_every_encoding(client, path, value):
    body = {"embedding": EMB} if path == "/gallery/search" else {"a": {"embedding": EMB}, "b": {"embedding": EMB}}
    _sent_every_way(client, path, "far", value, json.dumps(body))
    assert client.get("/readyz").status_code == 200


def test_good_values_pass_in_every_encoding(client):
    for r in (client.post("/gallery/search", files=[("images", _jpeg())], data={"top_k": "3", "far": "1e-2"}),
              client.post("/gallery/search", json={"embedding": EMB, "top_k": 3}, params={"far": 1e-2}),
              client.post("/verify", data={"a": json.dumps(EMB), "b": json.dumps(EMB), "far": "1e-2"})):
        assert r.status_code == 200, r.text
    r = client.post("/verify", json={"a": {"embedding": EMB}, "b": {"embedding": EMB}}, params={"far": 1e-2})
    assert r.json()["far"] == 1e-2


def test_a_field_sent_twice_is_refused(client):
    body = {"a": {"embedding": EMB}, "b": {"embedding": EMB}, "far": 1e-2}
    r = client.post("/verify", json=body, params={"far": 1e-3})
    assert "send it once" in _invalid(r, "far")


BAD_EMBEDDINGS = {"wrong size": [1.0] * 5, "all zeros": [0.0] * D, "overflowing": [1.7e308] * D,
                  "not numbers": ["1"] * D}


@pytest.mark.parametrize("kind", list(BAD_EMBEDDINGS))
def test_one_embedding_check_on_every_route(client, settings, kind):
    e = BAD_EMBEDDINGS[kind]
    _invalid(client.post("/verify", json={"a": {"embedding": e}, "b": {"embedding": EMB}}), "a.embedding")
    _invalid(client.post("/verify", data={"a": json.dumps(EMB), "b": json.dumps(e)}), "b.embedding")
    _invalid(client.post("/gallery/search", json={"embedding": e}), "embedding")
    _invalid(client.post("/gallery/someone", json={"embedding": e}), "embedding")
    if client.app.state.templates is not None:
        style = [0.0] * client.app.state.templates.fusion.card.style_size
        r = client.post(f"/templates/{_tid(settings)}/frames", json={"frames": [{"embedding": e, "style": style}]})
        _invalid(r, "frames.0.embedding")


def test_non_finite_embedding_values_name_their_position(client):
    body = '{"a": {"embedding": [%s]}, "b": {"embedding": [%s]}}' % (", ".join(["1.0"] * (D - 1) + ["NaN"]),
                                                                         ", ".join(["1.0"] * D))
    _invalid(_json(client, "/verify", body), f"a.embedding.{D - 1}")


@pytest.mark.parametrize("path", ["/embed", "/verify", "/templates/someone/frames", "/gallery/someone",
                                  "/gallery/search"])
def test_every_route_refuses_an_unknown_multipart_field(client, path):
    if path.startswith("/templates") and client.app.state.templates is None:
        pytest.skip(f"templates are off: {client.app.state.templates_off}")
    files = {"a": _jpeg(), "b": _jpeg()} if path == "/verify" else [("images", _jpeg())]
    _invalid(client.post(path, files=files, data={"topk": "3"}), "topk")


def test_multipart_frame_ids_have_the_json_bounds(client, settings):
    if client.app.state.templates is None:
        pytest.skip(f"templates are off: {client.app.state.templates_off}")
    r = client.post(f"/templates/{_tid(settings)}/frames", files=[("images", _jpeg())], data={"frame_ids": "x" * 129})
    _invalid(r, "frames.0.frame_id")
    assert client.get(f"/templates/{_tid(settings)}").status_code == 404  # nothing was written
