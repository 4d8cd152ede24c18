"""The real app (real models, the machine's real Redis) behind an HTTP test client."""
from __future__ import annotations

from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.helpers import REDIS_URL, drop_keys, make_settings


@pytest.fixture(scope="session")
def redis_available() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL} ({exc}); these tests need the real server")


@pytest.fixture(scope="package")
def settings(redis_available) -> Settings:
    # no scheduled self-test while the package's tests run: its inferences would land in the batch metrics
    # they count (the schedule has its own tests, with their own apps)
    s = make_settings(self_test_interval_s=3600)
    yield s
    drop_keys(s)


@pytest.fixture(scope="package")
def client(settings) -> TestClient:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="session")
def lfw(data_dir) -> Path:
    return data_dir / "lfw-dev" / "images"
