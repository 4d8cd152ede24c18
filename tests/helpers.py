"""Plain functions shared by test modules; fixtures live in the conftest.py files."""
from __future__ import annotations

import socket
import uuid
from pathlib import Path

import redis

from service.settings import Settings

REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def lfw_pairs(data_dir: Path, same: bool, k: int) -> list[tuple[str, int, str, int]]:
    """The first k same (or different) pairs of lfw-dev/pairs.txt as (name_a, i, name_b, j)."""
    rows = [line.split("\t") for line in (data_dir / "lfw-dev" / "pairs.txt").read_text().splitlines()[1:]]
    rows = [r for r in rows if (len(r) == 3) == same][:k]
    return [(r[0], int(r[1]), r[0], int(r[2])) if same else (r[0], int(r[1]), r[2], int(r[3])) for r in rows]


def photo(lfw: Path, name: str, n: int = 1) -> bytes:
    return (lfw / f"{name}_{n:04d}.jpg").read_bytes()


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
