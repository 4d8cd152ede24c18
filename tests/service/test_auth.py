"""Optional API keys: X-API-Key, compared in constant time, never logged."""
from __future__ import annotations

import logging

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.app import create_app
from service.auth import key_matches
from tests.helpers import drop_keys, make_settings

BODY = {"a": {"embedding": [1.0] * 128}, "b": {"embedding": [1.0] * 128}}


@pytest.fixture(scope="module")
def keyed(redis_available):
    settings = make_settings(api_keys=["first-key-123", "second-key-456"])
    with TestClient(create_app(settings)) as c:
        yield c
    drop_keys(settings)


def test_key_matches():
    keys = [SecretStr("alpha"), SecretStr("beta")]
    assert key_matches("alpha", keys) and key_matches("beta", keys)
    assert not key_matches("alph", keys) and not key_matches("", keys) and not key_matches("alpha ", keys)


def test_requests_need_a_valid_key(keyed, caplog):
    caplog.set_level(logging.DEBUG)
    missing = keyed.post("/verify", json=BODY)
    assert missing.status_code == 401 and missing.json()["error"]["code"] == "unauthorized"
    wrong = keyed.post("/verify", json=BODY, headers={"X-API-Key": "wrong-key-999"})
    assert wrong.status_code == 401
    for key in ("first-key-123", "second-key-456"):
        assert keyed.post("/verify", json=BODY, headers={"X-API-Key": key}).status_code == 200
    assert keyed.post("/embed", json={"images": [{"data": "AAAA"}]}).status_code == 401
    assert "wrong-key-999" not in caplog.text and "first-key-123" not in caplog.text


def test_health_and_metrics_stay_open(keyed):
    assert keyed.get("/healthz").status_code == 200
    assert keyed.get("/readyz").status_code == 200
    assert keyed.get("/metrics").status_code == 200
