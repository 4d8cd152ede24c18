"""The Redis template memory against the real Redis: commutative, atomic, deduplicated appends."""
from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest
import redis.asyncio as aioredis

from service.errors import Conflict, NotFound
from service.template_store import TemplateStore
from tests.helpers import REDIS_URL

L = 580  # M = 4 clusters × (128 feature + 16 style + 1 count), as the default fusion model

pytestmark = pytest.mark.anyio  # anyio's pytest plugin runs the async tests and fixtures


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
async def store(redis_available):
    client = aioredis.from_url(REDIS_URL)
    prefix = f"faceset-test-{uuid.uuid4().hex[:8]}:"
    yield TemplateStore(client, prefix, L, model="fusion-test:1", id_window=1000)
    keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def _deltas(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, L))


async def test_memory_is_the_sum_whatever_the_order_and_batching(store):
    deltas = _deltas(60)
    expected = deltas.sum(axis=0)
    rng = np.random.default_rng(1)
    for t in range(3):
        order = rng.permutation(60)
        cuts = np.sort(rng.choice(np.arange(1, 60), size=5, replace=False))
        for part in np.split(order, cuts):
            await store.append(f"t{t}", deltas[part], [None] * len(part))
        memory = await store.read(f"t{t}")
        assert memory.frames == 60
        np.testing.assert_allclose(memory.sums, expected, rtol=0, atol=1e-12)


async def test_a_repeated_frame_id_is_not_counted_twice(store):
    d = _deltas(3)
    first = await store.append("x", d, ["a", "b", "c"])
    assert first.added == [True, True, True]
    again = await store.append("x", d[[1, 2]], ["b", "c"])  # a client retrying
    assert again.added == [False, False] and again.memory.frames == 3
    mixed = await store.append("x", _deltas(3, seed=5), ["d", "d", None])  # the same id twice in one call
    assert mixed.added == [True, False, True] and mixed.memory.frames == 5
    np.testing.assert_allclose(mixed.memory.sums, d.sum(0) + _deltas(3, seed=5)[[0, 2]].sum(0), atol=1e-12)


async def test_concurrent_writers_lose_nothing(store):
    deltas = _deltas(2000, seed=3)
    ids = [f"frame-{i}" for i in range(2000)]

    async def writer(w: int) -> None:
        for start in range(w * 250, (w + 1) * 250, 10):
            await store.append("busy", deltas[start : start + 10], ids[start : start + 10])
            await store.append("busy", deltas[start : start + 2], ids[start : start + 2])  # retried: duplicates

    await asyncio.gather(*(writer(w) for w in range(8)))
    memory = await store.read("busy")
    assert memory.frames == 2000
    np.testing.assert_allclose(memory.sums, deltas.sum(0), atol=1e-9)


async def test_unknown_delete_and_model_mismatch(store):
    with pytest.raises(NotFound):
        await store.read("nobody")
    with pytest.raises(NotFound):
        await store.delete("nobody")
    await store.append("y", _deltas(1), [None])
    other = TemplateStore(store.client, store.prefix, L, model="fusion-test:2")
    with pytest.raises(Conflict):
        await other.append("y", _deltas(1), [None])
    await store.delete("y")
    assert await store.client.exists(*store.keys("y")) == 0


async def test_memory_does_not_grow_with_frames(store):
    await store.append("m", _deltas(10), [None] * 10)
    small = (await store.memory_bytes("m"))["memory"]
    for k in range(10):
        await store.append("m", _deltas(100, seed=k), [None] * 100)
    assert (await store.memory_bytes("m"))["memory"] == small


async def test_a_connection_killed_mid_append_leaves_before_or_after(store):
    import socket

    from redis.connection import Connection

    await store.append("k", _deltas(5), [None] * 5)
    before = await store.read("k")
    batch = _deltas(50, seed=9)
    sha = store._append.sha
    args = [store.model, L, store.id_window, len(batch)]
    for row in batch:
        args += ["", row.astype("<f8").tobytes()]
    wire = b"".join(Connection().pack_command("EVALSHA", sha, 2, *store.keys("k"), *args))
    host, port = "127.0.0.1", 6379
    for cut in (10, len(wire) // 3, len(wire) - 1):  # the command cut off at three points
        with socket.create_connection((host, port)) as s:
            s.sendall(wire[:cut])
        now = await store.read("k")
        assert now.frames == before.frames and np.array_equal(now.sums, before.sums)
    with socket.create_connection((host, port)) as s:  # whole command sent, connection gone before the reply
        s.sendall(wire)
    for _ in range(100):
        now = await store.read("k")
        if now.frames != before.frames:
            break
        await asyncio.sleep(0.01)
    assert now.frames == before.frames + 50
    np.testing.assert_allclose(now.sums, before.sums + batch.sum(0), atol=1e-12)
