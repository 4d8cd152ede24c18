"""Every error path answers its status with the one JSON problem body, and leaves the service healthy."""
from __future__ import annotations

import base64
import io

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.errors import STATUS, ServiceError
from tests.helpers import drop_keys, make_settings

pytestmark = pytest.mark.usefixtures("redis_available")


def _jpeg(size=(64, 64)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (120, 90, 60)).save(buf, format="JPEG")
    return buf.getvalue()


def _bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("1", (30_000, 30_000)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def small_client(redis_available):
    """An app with small limits so the 413s are cheap to reach."""
    settings = make_settings(max_body_bytes=256 * 1024, max_images=3, max_image_pixels=1_000_000)
    with TestClient(create_app(settings)) as c:
        yield c
    drop_keys(settings)


def _chunks(data: bytes, size: int = 8192):
    for i in range(0, len(data), size):
        yield data[i : i + size]


CASES = {
    "declared body too large": (413, "payload_too_large",
                                lambda c: c.post("/embed", content=b"x" * 300_000, headers={"content-type": "application/json"})),
    "chunked body too large": (413, "payload_too_large",
                               lambda c: c.post("/embed", content=_chunks(b"{" + b" " * 300_000), headers={"content-type": "application/json"})),
    "too many images": (413, "payload_too_large",
                        lambda c: c.post("/embed", files=[("images", _jpeg())] * 4)),
    "too many images (JSON)": (413, "payload_too_large",
                               lambda c: c.post("/embed", json={"images": [{"data": base64.b64encode(_jpeg()).decode()}] * 4})),
    "wrong content type": (415, "unsupported_media_type",
                           lambda c: c.post("/embed", content=b"abc", headers={"content-type": "text/plain"})),
    "GIF": (415, "unsupported_media_type", lambda c: c.post("/embed", files=[("images", b"GIF89a" + b"\x00" * 64)])),
    "corrupt JPEG": (422, "undecodable_image", lambda c: c.post("/embed", files=[("images", _jpeg()[:300])])),
    "decompression bomb": (422, "image_too_large", lambda c: c.post("/embed", files=[("images", _bomb())])),
    "too many pixels": (422, "image_too_large", lambda c: c.post("/embed", files=[("images", _jpeg((1100, 1000)))])),
    "bad base64": (422, "invalid_input", lambda c: c.post("/embed", json={"images": [{"data": "not base64!"}]})),
    "malformed JSON": (422, "invalid_input",
                       lambda c: c.post("/embed", content=b"{nope", headers={"content-type": "application/json"})),
    "no images field": (422, "invalid_input", lambda c: c.post("/embed", files=[("other", _jpeg())])),
    "empty image list": (422, "invalid_input", lambda c: c.post("/embed", json={"images": []})),
    "bad query option": (422, "invalid_input", lambda c: c.post("/embed", params={"max_faces": 0}, files=[("images", _jpeg())])),
    "verify missing side": (422, "invalid_input", lambda c: c.post("/verify", files={"a": _jpeg()})),
    "verify both image and embedding": (422, "invalid_input", lambda c: c.post("/verify", json={
        "a": {"data": base64.b64encode(_jpeg()).decode(), "embedding": [1.0]}, "b": {"embedding": [1.0]}})),
    "verify wrong embedding size": (422, "invalid_input",
                                    lambda c: c.post("/verify", json={"a": {"embedding": [1.0] * 5}, "b": {"embedding": [1.0] * 5}})),
    "verify zero embedding": (422, "invalid_input",
                              lambda c: c.post("/verify", json={"a": {"embedding": [0.0] * 128}, "b": {"embedding": [1.0] * 128}})),
    "verify FAR beyond calibration": (422, "invalid_input", lambda c: c.post("/verify", params={"far": 1e-9}, json={
        "a": {"embedding": [1.0] * 128}, "b": {"embedding": [1.0] * 128}})),
    "verify text that is not an embedding": (422, "invalid_input",
                                             lambda c: c.post("/verify", data={"a": "[1, 2", "b": "[true]"})),
    "unknown route": (404, "not_found", lambda c: c.get("/no-such-route")),
    "wrong method": (405, "method_not_allowed", lambda c: c.get("/embed")),
}


@pytest.mark.parametrize("name", list(CASES))
def test_error_answers_its_status_and_the_service_stays_healthy(small_client, name):
    status, code, call = CASES[name]
    r = call(small_client)
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["code"] == code and body["error"]["message"]
    assert small_client.get("/readyz").status_code == 200
    ok = small_client.post("/verify", json={"a": {"embedding": [1.0] * 128}, "b": {"embedding": [1.0] * 128}})
    assert ok.status_code == 200 and ok.json()["match"] is True


def test_every_error_class_has_a_status():
    classes = set(ServiceError.__subclasses__()) | {ServiceError}
    assert classes <= set(STATUS)


def test_unexpected_errors_are_500_without_details(small_client, monkeypatch):
    async def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(small_client.app.state.faces, "verify", broken)
    plain = TestClient(small_client.app, raise_server_exceptions=False)  # answer as a server would, not re-raise
    r = plain.post("/verify", json={"a": {"embedding": [1.0] * 128}, "b": {"embedding": [1.0] * 128}})
    assert r.status_code == 500 and r.json() == {"error": {"code": "internal_error", "message": "internal error"}}


def test_beyond_max_concurrent_requests_is_429(small_client):
    state = small_client.app.state
    state.active_requests = state.settings.max_concurrent_requests  # as if that many were in progress
    try:
        r = small_client.post("/verify", json={"a": {"embedding": [1.0] * 128}, "b": {"embedding": [1.0] * 128}})
        assert r.status_code == 429 and r.json()["error"]["code"] == "overloaded" and r.headers["Retry-After"] == "1"
        assert small_client.get("/readyz").status_code == 200  # health is never refused
    finally:
        state.active_requests = 0
    ok = small_client.post("/verify", json={"a": {"embedding": [1.0] * 128}, "b": {"embedding": [1.0] * 128}})
    assert ok.status_code == 200 and state.active_requests == 0


def test_redis_down_is_503_for_what_needs_it(redis_available):
    settings = make_settings(redis_url="redis://127.0.0.1:1/0")
    with TestClient(create_app(settings)) as c:
        if c.app.state.templates is None:
            pytest.skip(f"templates are off: {c.app.state.templates_off}")
        r = c.get("/templates/someone")
        assert r.status_code == 503 and r.json()["error"]["code"] == "unavailable" and r.headers["Retry-After"] == "5"
        assert c.post("/verify", json={"a": {"embedding": [1.0] * 128}, "b": {"embedding": [1.0] * 128}}).status_code == 200


def test_a_malformed_multipart_form_is_422(small_client):
    boundary = "b0undary"
    fields = "".join(f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"\r\n\r\nx\r\n' for i in range(40))
    r = small_client.post("/verify", content=(fields + f"--{boundary}--\r\n").encode(),
                          headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_input" and "multipart" in r.json()["error"]["message"]
