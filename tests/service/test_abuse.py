"""Hostile clients (issue 11): each defect found by trying the service as an attacker, as a regression test."""
from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from tests.helpers import make_settings


def _request_series(client) -> set[tuple]:
    families = text_string_to_metric_families(client.get("/metrics").text)
    return {tuple(sorted(s.labels.items())) for f in families if f.name == "faceset_requests" for s in f.samples}


def test_made_up_methods_and_paths_add_no_metric_labels(client):
    client.request("BREW", "/embed")  # the shared "other" and "unmatched" series exist before counting
    client.get("/nowhere")
    before = _request_series(client)
    for i in range(100):
        client.request(f"M{i}X", "/embed")
        client.get(f"/made-up/{i}")
    after = _request_series(client)
    assert after - before <= {(("method", "GET"), ("route", "/metrics"), ("status", "200"))}
    assert {dict(labels)["method"] for labels in after} <= {"GET", "POST", "other"}


def test_readyz_runs_no_inference(redis_available):
    """/readyz is open and outside admission control, so it must be cheap: it reports the scheduled self-test."""
    with TestClient(create_app(make_settings(self_test_interval_s=3600))) as c:
        batches = c.app.state.batcher.stats.batches
        for _ in range(200):
            assert c.get("/readyz").status_code == 200
        assert c.app.state.batcher.stats.batches == batches
