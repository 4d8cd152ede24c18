"""Faults under load (issue 11, the suite): Redis killed mid-stream, the service sent SIGTERM mid-request."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.templates import frame_deltas
from tests.helpers import REDIS_URL, drop_keys, free_port, make_settings, photo

WRITERS, TEMPLATES, CALLS, PER_CALL = 8, 4, 30, 4
BOUND_S = 60.0


class OwnRedis:
    """A redis-server of the test's own on a loopback port, append-only with an fsync per write."""

    def __init__(self, directory) -> None:
        self.port, self.dir = free_port(), directory
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        self.process = subprocess.Popen(
            [shutil.which("redis-server"), "--bind", "127.0.0.1", "--port", str(self.port), "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client, deadline = redis.Redis(port=self.port, socket_timeout=1), time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if client.ping():
                    return
            except redis.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within 10 s")

    def kill(self) -> None:
        self.process.kill()  # SIGKILL: no shutdown, nothing flushed beyond what each write fsync'd
        self.process.wait(10)


@pytest.fixture
def own_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    if server.process.poll() is None:
        server.process.terminate()
        server.process.wait(10)


def _precomputed_frames(client, lfw) -> list[dict]:
    """Each face of a few real photos, embedded once, as a precomputed frame (without its frame id)."""
    names = ["Abel_Pacheco", "Akhmed_Zakayev", "Amber_Tamblyn", "Anders_Fogh_Rasmussen"]
    files = [("images", (f"{n}.jpg", photo(lfw, n), "image/jpeg")) for n in names]
    body = client.post("/embed", files=files, params={"include_style": "true", "max_faces": 1})
    assert body.status_code == 200, body.text
    faces = [r["faces"][0] for r in body.json()["results"]]
    return [{"embedding": f["embedding"], "magnitude": f["magnitude"], "style": f["style"]} for f in faces]


def _writer(client, w: int, faces: list[dict], acked: dict, statuses: Counter, deadline: float) -> None:
    """Streams CALLS requests of PER_CALL frames into template w % TEMPLATES, each retried with the same
    frame ids until acknowledged (200)."""
    template = f"tpl-{w % TEMPLATES}"
    for call in range(CALLS):
        ids = [f"w{w}-c{call}-f{k}" for k in range(PER_CALL)]
        frames = [{**faces[(call + k) % len(faces)], "frame_id": fid} for k, fid in enumerate(ids)]
        while time.monotonic() < deadline:
            response = client.post(f"/templates/{template}/frames", json={"frames": frames})
            statuses[response.status_code] += 1
            if response.status_code == 200:
                acked[template].update({fid: frames[k] for k, fid in enumerate(ids)})
                if call % 5 == 0:  # a client that missed the answer sends again: nothing may count twice
                    again = client.post(f"/templates/{template}/frames", json={"frames": frames})
                    statuses[again.status_code] += 1
                    assert again.status_code != 200 or again.json()["accepted"] == 0, again.text
                break
            assert response.status_code == 503, response.text  # Redis away: retry; anything else is a defect
            time.sleep(0.05)


def _fused_in_one_batch(templates, frames: list[dict]) -> np.ndarray:
    """The template of `frames` built at once, through the service's own fusion model."""
    raw = np.array([np.asarray(f["embedding"]) / np.linalg.norm(f["embedding"]) * f["magnitude"] for f in frames])
    style = np.array([f["style"] for f in frames])
    fusion = templates.fusion
    deltas = frame_deltas(fusion, fusion.assign(raw.astype(np.float32), style.astype(np.float32)))  # (N, L)
    return fusion.aggregate(*fusion.memory_from_vector(deltas.sum(0))).embedding


def test_redis_killed_mid_stream_loses_nothing_acknowledged_and_counts_nothing_twice(own_redis, lfw):
    started = time.monotonic()
    settings = make_settings(redis_url=f"redis://127.0.0.1:{own_redis.port}/0")
    acked: dict[str, dict[str, dict]] = {f"tpl-{t}": {} for t in range(TEMPLATES)}
    statuses: Counter = Counter()
    with TestClient(create_app(settings)) as client:
        faces = _precomputed_frames(client, lfw)
        deadline = started + BOUND_S - 10
        with ThreadPoolExecutor(WRITERS) as pool:
            futures = [pool.submit(_writer, client, w, faces, acked, statuses, deadline) for w in range(WRITERS)]
            total = WRITERS * CALLS * PER_CALL
            while sum(map(len, acked.values())) < total // 3 and time.monotonic() < deadline:
                time.sleep(0.01)
            own_redis.kill()
            time.sleep(1.0)
            own_redis.start()  # same port, same directory: it replays its append-only file
            for f in futures:
                f.result()
        assert statuses[503] > 0, f"no request met the dead Redis: the kill was not mid-stream ({statuses})"
        assert sum(map(len, acked.values())) == total, f"not every frame acknowledged within the bound: {statuses}"
        for template, frames in acked.items():
            got = client.get(f"/templates/{template}")
            assert got.status_code == 200, got.text
            assert got.json()["frames"] == len(frames)  # nothing acknowledged lost, no retry counted twice
            reference = _fused_in_one_batch(client.app.state.templates, list(frames.values()))
            assert float(np.dot(got.json()["embedding"], reference)) > 0.9999
        assert client.get("/readyz").status_code == 200
    assert time.monotonic() - started < BOUND_S


CLIENTS, IMAGES_PER_REQUEST = 6, 6
EXIT_BOUND_S = 35.0  # uvicorn's timeout_graceful_shutdown (service/cli.py) is 30 s


def _serve(port: int, prefix: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESET_")} | {
        "FACESET_REDIS_URL": REDIS_URL, "FACESET_KEY_PREFIX": prefix, "FACESET_ENGINE_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline, ready = time.monotonic() + 60, None
    while time.monotonic() < deadline and proc.poll() is None and (ready is None or ready.status_code != 200):
        try:
            ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
        except httpx.HTTPError:
            time.sleep(0.2)
    if ready is None or ready.status_code != 200:
        proc.kill()
        pytest.fail(f"faceset serve was not ready within 60 s: {proc.communicate(timeout=10)[0][-2000:]}")
    return proc


def _embed(base: str, files: list, log: list) -> None:
    """One /embed on a connection of its own; logs (sent, done, status or the error's type)."""
    sent = time.monotonic()
    try:
        outcome = httpx.post(f"{base}/embed", files=files, timeout=60).status_code
    except httpx.HTTPError as exc:
        outcome = type(exc).__name__
    log.append((sent, time.monotonic(), outcome))


@pytest.mark.slow
def test_sigterm_under_load_finishes_requests_in_flight_refuses_new_ones_and_exits(redis_available, lfw):
    port, settings = free_port(), make_settings()
    base = f"http://127.0.0.1:{port}"
    files = [("images", (f"{i}.jpg", photo(lfw, "Abel_Pacheco"), "image/jpeg")) for i in range(IMAGES_PER_REQUEST)]
    proc = _serve(port, settings.key_prefix)
    log: list = []
    try:
        stop = threading.Event()

        def client() -> None:
            for _ in range(50):  # bounded; stops sending at SIGTERM
                if stop.is_set():
                    return
                _embed(base, files, log)

        threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 30
        while sum(o == 200 for _, _, o in log) < CLIENTS and time.monotonic() < deadline:
            time.sleep(0.01)
        stop.set()
        term = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        late: list = []
        _embed(base, files, late)  # a new connection after SIGTERM
        for t in threads:
            t.join(60)
        out = proc.communicate(timeout=EXIT_BOUND_S)[0]
        exited = time.monotonic() - term
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    # sent before SIGTERM and still open at it; a ConnectError there is a connection the busy client opened only
    # after the listener closed (refused, as new ones must be): every request the server accepted ends 200
    in_flight = [o for sent, done, o in log if sent < term - 0.1 and done > term and o != "ConnectError"]
    assert in_flight and all(o == 200 for o in in_flight), (in_flight, out[-2000:])
    assert late[0][2] in ("ConnectError", 503), late
    assert proc.returncode == 0 and exited < EXIT_BOUND_S, (proc.returncode, exited, out[-2000:])
    keys = list(redis.Redis.from_url(REDIS_URL).scan_iter(match=f"{settings.key_prefix}*"))
    drop_keys(settings)
    assert keys == []  # /embed writes nothing to Redis, and shutdown leaves nothing behind
