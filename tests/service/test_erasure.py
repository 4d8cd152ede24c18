"""Complete erasure: after DELETE, nothing that identifies the person stays in Redis's keys, its files or
any replica's index. Runs its own redis-server (append-only, a temp dir of its own) so its files can be read."""
from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import redis
import redis.asyncio as aioredis
from fastapi.testclient import TestClient

from service.app import create_app
from service.redis_store import FileEraser
from tests.helpers import make_settings

INTERVAL = 0.5  # FACESET_ERASURE_INTERVAL_S for these apps
BOUND = INTERVAL + 10.0  # the interval plus two rewrites of a tiny data set, generously

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory) -> tuple[str, Path]:
    """(url, data dir) of a redis-server of our own; a plain-RESP AOF base so a byte search can see what it holds."""
    folder = tmp_path_factory.mktemp("redis")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--appendonly", "yes", "--save", "", "--aof-use-rdb-preamble", "no",
                             "--daemonize", "no"], stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0", folder
    client.close()
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def settings(own_redis):
    return make_settings(redis_url=own_redis[0], erasure_interval_s=INTERVAL)


@pytest.fixture(scope="module")
def replicas(settings):
    """Two replicas of the service over the one Redis."""
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        yield a, b


def _leaks(blob: bytes, secret: bytes) -> bool:
    """Whether `blob` holds `secret` (an id), or for a vector any 8 bytes of it."""
    if len(secret) < 64:
        return secret in blob
    return any(secret[i:i + 8] in blob for i in range(0, len(secret) - 7, 4))


def _everything(r: redis.Redis, prefix: str) -> list[bytes]:
    """Every key under `prefix` with everything it holds: names, fields, values, stream entries."""
    out = []
    for key in r.scan_iter(match=f"{prefix}*"):
        out.append(key)
        kind = r.type(key)
        if kind == b"hash":
            out += [x for kv in r.hgetall(key).items() for x in kv]
        elif kind == b"stream":
            out += [x for _, fields in r.xrange(key) for kv in fields.items() for x in kv]
        elif kind == b"zset":
            out += r.zrange(key, 0, -1)
        elif kind == b"string":
            out.append(r.get(key))
        else:
            raise AssertionError(f"{key}: a {kind} this test does not read")
    return [x if isinstance(x, bytes) else str(x).encode() for x in out]


def _files(folder: Path) -> bytes:
    """What Redis's files hold (Redis 7: a multi-part AOF in appendonlydir/)."""
    return b"".join(p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".sock")


def _wait_until_files_lack(folder: Path, secrets: list[bytes]) -> float:
    start = time.monotonic()
    while any(_leaks(_files(folder), s) for s in secrets):
        assert time.monotonic() - start < BOUND, "erased data still in Redis's files after the bound"
        time.sleep(0.1)
    return time.monotonic() - start


def test_a_deleted_identity_leaves_no_key_and_no_replica_index(replicas, settings):
    a, b = replicas
    g = {"X-Gallery": "erasure"}
    dim = a.app.state.faces.card.embedding_size
    rng = np.random.default_rng(0)
    victim, keeper = f"victim-{uuid.uuid4().hex[:8]}", "keeper"
    kept = a.post(f"/gallery/{keeper}", json={"embedding": rng.normal(size=dim).tolist()}, headers=g)
    assert kept.status_code == 200
    # the victim with all the gallery keeps of a person: a CAFace memory (her frame) and a negative
    style = rng.normal(size=a.app.state.templates.fusion.card.style_size)
    frame = {"embedding": rng.normal(size=dim).tolist(), "style": style.tolist()}
    assert a.post(f"/gallery/{victim}", json={"frames": [frame]}, headers=g).status_code == 200
    assert a.post(f"/gallery/{victim}/negatives", json={"embeddings": [rng.normal(size=dim).tolist()]},
                  headers=g).status_code == 200
    store = a.app.state.gallery.store
    r = redis.Redis.from_url(settings.redis_url.get_secret_value())
    stored = r.hget(store.keys("erasure")[0], victim)[-4 * dim:]  # the vector exactly as Redis holds it
    photos, negatives = (r.hget(key, victim) for key in store.identity_keys("erasure"))
    memory = photos[-8 * a.app.state.templates.fusion.memory_size:]  # the memory's sums, past the record's header
    probe = np.frombuffer(stored, "<f4").tolist()
    found = b.post("/gallery/search", json={"embedding": probe}, headers=g).json()
    assert found["results"][0]["identified"] == victim  # replica b holds her in its index
    assert a.delete(f"/gallery/{victim}", headers=g).status_code == 200

    held = _everything(r, settings.key_prefix)
    assert not [x for x in held if any(_leaks(x, s) for s in (victim.encode(), stored, memory, negatives))]
    assert any(keeper.encode() in x for x in held)  # the check can see what Redis holds
    for replica in (a, b):
        assert replica.get("/gallery", headers=g).json()["count"] == 1
        idx = replica.app.state.gallery.indexes["erasure"]
        assert list(idx.names.values()) == [keeper] and len(idx) == 1
        matches = replica.post("/gallery/search", json={"embedding": probe, "top_k": 5},
                               headers=g).json()["results"][0]["matches"]
        assert [m["id"] for m in matches] == [keeper]
    r.close()


def test_deletions_leave_redis_files_within_the_bound_at_one_rewrite_per_burst(replicas, settings, own_redis):
    a, _ = replicas
    g = {"X-Gallery": "files"}
    dim = a.app.state.faces.card.embedding_size
    rng = np.random.default_rng(1)
    r = redis.Redis.from_url(settings.redis_url.get_secret_value())
    victims = [f"gone-{uuid.uuid4().hex[:8]}" for _ in range(10)]
    for who in [*victims, "stays"]:
        assert a.post(f"/gallery/{who}", json={"embedding": rng.normal(size=dim).tolist()}, headers=g).status_code == 200
    emb = a.app.state.gallery.store.keys("files")[0]
    secrets = [s for v in victims for s in (v.encode(), r.hget(emb, v)[8:])]
    time.sleep(2 * INTERVAL)  # no round owed: the burst below starts one at once
    rewrites = r.info("persistence")["aof_rewrites"]
    for who in victims:  # a burst of deletions
        assert a.delete(f"/gallery/{who}", headers=g).status_code == 200
    assert any(_leaks(_files(own_redis[1]), s) for s in secrets)  # the appended writes are on disk until rewritten
    _wait_until_files_lack(own_redis[1], secrets)
    assert b"stays" in _files(own_redis[1])  # the files still hold the data set
    time.sleep(2 * INTERVAL)
    assert r.info("persistence")["aof_rewrites"] - rewrites <= 2  # one at once, one for those that came during it
    r.close()


@pytest.mark.data
def test_a_deleted_template_leaves_no_key_and_no_file(replicas, settings, own_redis, data_dir):
    a, _ = replicas
    if a.app.state.templates is None:
        pytest.skip(f"templates are off: {a.app.state.templates_off}")
    photos = sorted(next(p for p in sorted((data_dir / "celeba-299").iterdir()) if p.is_dir()).glob("*.jpg"))[:3]
    tid = f"tpl-{uuid.uuid4().hex[:8]}"
    frame_ids = [f"cam-{uuid.uuid4().hex[:8]}-{k}" for k in range(len(photos))]
    r = a.post(f"/templates/{tid}/frames", files=[("images", p.read_bytes()) for p in photos]
               + [("frame_ids", (None, f)) for f in frame_ids])
    assert r.status_code == 200 and r.json()["accepted"] == len(photos), r.text
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    sums = client.hget(a.app.state.templates.store.keys(tid)[0], "sum")
    secrets = [tid.encode(), *(f.encode() for f in frame_ids), sums]
    assert a.delete(f"/templates/{tid}").status_code == 200
    assert not [x for x in _everything(client, settings.key_prefix) if any(_leaks(x, s) for s in secrets)]
    _wait_until_files_lack(own_redis[1], secrets)
    client.close()


@pytest.mark.anyio
async def test_a_server_refusing_the_rewrite_gets_one_warning(own_redis, caplog):
    admin = redis.Redis.from_url(own_redis[0])
    user = f"no-rewrite-{uuid.uuid4().hex[:6]}"
    admin.acl_setuser(user, enabled=True, passwords=["+pw"], keys=["*"], commands=["+@all", "-bgrewriteaof"])
    client = aioredis.from_url(own_redis[0].replace("redis://", f"redis://{user}:pw@"))
    eraser = FileEraser(client, "faceset-test:", interval=0.05)
    with caplog.at_level(logging.WARNING, logger="service.redis_store"):
        eraser.start()
        for _ in range(3):
            eraser.erased()
            await asyncio.sleep(0.2)
        await eraser.stop()
    assert [rec.getMessage().startswith("Redis refused") for rec in caplog.records] == [True]
    await client.aclose()
    admin.acl_deluser(user)
    admin.close()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
