"""The real app (real models, the machine's real Redis) behind an HTTP test client."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"


def make_settings(**overrides) -> Settings:
    """Settings for a test app: the shared Redis under a key prefix of its own."""
    values = {"redis_url": REDIS_URL, "key_prefix": f"faceset-test-{uuid.uuid4().hex[:8]}:", "engine_threads": 1}
    values.update(overrides)
    return Settings(**values)


def drop_keys(settings: Settings) -> None:
    if settings.redis_url is None:
        return
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    keys = list(client.scan_iter(match=f"{settings.key_prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


@pytest.fixture(scope="session")
def redis_available() -> None:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError as exc:
        pytest.skip(f"no Redis at {REDIS_URL} ({exc}); these tests need the real server")


@pytest.fixture(scope="package")
def settings(redis_available) -> Settings:
    s = make_settings()
    yield s
    drop_keys(s)


@pytest.fixture(scope="package")
def client(settings) -> TestClient:
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.fixture(scope="session")
def lfw(data_dir) -> Path:
    return data_dir / "lfw-dev" / "images"


def photo(lfw: Path, name: str, n: int = 1) -> bytes:
    return (lfw / f"{name}_{n:04d}.jpg").read_bytes()


def lfw_pairs(data_dir: Path, same: bool, k: int) -> list[tuple[str, int, str, int]]:
    rows = [line.split("\t") for line in (data_dir / "lfw-dev" / "pairs.txt").read_text().splitlines()[1:]]
    rows = [r for r in rows if (len(r) == 3) == same][:k]
    return [(r[0], int(r[1]), r[0], int(r[2])) if same else (r[0], int(r[1]), r[2], int(r[3])) for r in rows]
