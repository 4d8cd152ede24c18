"""Liveness, readiness (scheduled real inference + real Redis), Prometheus metrics and the embedded Redis."""
from __future__ import annotations

import os
import shutil
import time

import pytest
import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.faces import probe_image
from service.redis_store import EmbeddedRedis
from tests.helpers import make_settings


def _samples(client) -> dict[tuple, float]:
    text = client.get("/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _value(samples, metric, **labels) -> float:
    return samples.get((metric, tuple(sorted(labels.items()))), 0.0)


def readyz_within(client, status: int, bound_s: float):
    """/readyz reports scheduled checks: poll it (bounded) until it answers `status`."""
    deadline = time.monotonic() + bound_s
    while True:
        r = client.get("/readyz")
        if r.status_code == status or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_live_and_ready(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    checks = ready.json()["checks"]
    assert checks["model"]["ok"] and "probe cosine 1.0" in checks["model"]["detail"]
    assert checks["redis"] == {"ok": True, "detail": "redis answered PING"}


def test_redis_down_makes_readiness_503_and_liveness_stays(redis_available):
    settings = make_settings(redis_url="redis://127.0.0.1:1/0")  # nothing listens on port 1
    with TestClient(create_app(settings)) as c:
        r = c.get("/readyz")
        assert r.status_code == 503
        body = r.json()
        assert body["ready"] is False and body["checks"]["redis"]["ok"] is False and body["checks"]["model"]["ok"]
        assert body["error"]["code"] == "unavailable" and "redis" in body["error"]["message"]
        assert c.get("/healthz").status_code == 200


def test_a_broken_engine_makes_readiness_503_within_the_schedule_and_recovers(redis_available, monkeypatch):
    with TestClient(create_app(make_settings(self_test_interval_s=0.2))) as c:
        def garbage(batch):
            raise RuntimeError("device lost")

        monkeypatch.setattr(c.app.state.batcher.engine, "run", garbage)
        body = readyz_within(c, 503, bound_s=0.2 + 2).json()
        assert body["ready"] is False and "device lost" in body["checks"]["model"]["detail"]
        monkeypatch.undo()
        assert readyz_within(c, 200, bound_s=1 + 2).status_code == 200  # reruns within 1 s of a failure


def test_metrics_count_requests_faces_batches_and_quality(client, data_dir):
    before = _samples(client)
    data = (data_dir / "lfw-dev" / "images" / "Abel_Pacheco_0001.jpg").read_bytes()
    assert client.post("/embed", files=[("images", data), ("images", data)]).status_code == 200
    assert client.post("/embed", files=[("images", b"GIF89a")]).status_code == 415
    after = _samples(client)

    def delta(metric, **labels):
        return _value(after, metric, **labels) - _value(before, metric, **labels)

    assert delta("faceset_requests_total", route="/embed", method="POST", status="200") == 1
    assert delta("faceset_requests_total", route="/embed", method="POST", status="415") == 1
    assert delta("faceset_errors_total", code="unsupported_media_type") == 1
    assert delta("faceset_faces_embedded_total") == 2
    assert delta("faceset_face_quality_count") == 2
    assert delta("faceset_batch_size_count") >= 1 and delta("faceset_batch_size_sum") == 4  # 2 faces × flip TTA
    assert delta("faceset_inference_seconds_count") >= 1 and delta("faceset_batch_queue_wait_seconds_count") >= 1
    assert delta("faceset_images_total", outcome="with_face") == 2
    assert delta("faceset_request_duration_seconds_count", route="/embed", method="POST") == 2
    assert _value(after, "faceset_model_info", name="faceset-dlib-magface", version=client.app.state.faces.card.version,
                  engine=client.app.state.batcher.engine.name) == 1


def test_unmatched_paths_share_one_label(client):
    client.get("/x/1")
    client.get("/x/2")
    assert _value(_samples(client), "faceset_requests_total", route="unmatched", method="GET", status="404") >= 2


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed on this machine")
def test_without_a_redis_url_the_service_runs_its_own(tmp_path):
    settings = make_settings(redis_url=None, state_dir=tmp_path)
    with TestClient(create_app(settings)) as c:
        assert c.get("/readyz").json()["checks"]["redis"]["ok"]
        server = c.app.state.embedded_redis
        pid = server.process.pid
        redis.Redis(unix_socket_path=str(server.socket)).set("k", "v")
    assert server.process is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    again = EmbeddedRedis(tmp_path)  # the data survives a restart (append-only file in state_dir)
    again.start()
    try:
        assert redis.Redis(unix_socket_path=str(again.socket)).get("k") == b"v"
    finally:
        again.stop()


def test_openapi_documents_both_body_forms(client):
    spec = client.get("/openapi.json").json()
    for path in ("/embed", "/verify"):
        content = spec["paths"][path]["post"]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}
        ref = content["application/json"]["schema"]["$ref"].split("/")[-1]
        assert ref in spec["components"]["schemas"]
    assert {"/healthz", "/readyz", "/metrics"} <= set(spec["paths"])
    assert "ImageData" in spec["components"]["schemas"]


def test_probe_image_has_no_face(client):  # so readiness never depends on detecting a face
    assert client.app.state.faces.pipeline.detect(probe_image()) == []


def test_docs_page_works_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200 and "/docs-static/swagger-ui-bundle.js" in page.text
    assert "cdn" not in page.text.lower()
    script = client.get("/docs-static/swagger-ui-bundle.js")
    assert script.status_code == 200 and len(script.content) > 100_000


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed on this machine")
def test_redis_dying_and_coming_back(tmp_path):
    """Redis goes away mid-service: readiness and templates answer 503, faces keep working; it returns: all recover."""
    server = EmbeddedRedis(tmp_path)
    settings = make_settings(redis_url=server.start())
    try:
        with TestClient(create_app(settings)) as c:
            if c.app.state.templates is None:
                pytest.skip(f"templates are off: {c.app.state.templates_off}")
            assert c.get("/readyz").status_code == 200
            server.stop()
            assert readyz_within(c, 503, settings.readiness_redis_ttl_s + 1).status_code == 503
            down = c.get("/templates/anyone")
            assert down.status_code == 503 and down.json()["error"]["code"] == "unavailable"
            assert c.post("/verify", json={"a": {"embedding": [1.0] * 128}, "b": {"embedding": [1.0] * 128}}).status_code == 200
            server.start()
            assert readyz_within(c, 200, settings.readiness_redis_ttl_s + 1).status_code == 200
            assert c.get("/templates/anyone").status_code == 404  # Redis answers again: an unknown template
    finally:
        server.stop()
