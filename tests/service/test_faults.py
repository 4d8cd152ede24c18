"""Faults under load (issue 11, the suite): Redis killed mid-stream, the service sent SIGTERM mid-request."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from service.app import create_app
from service.templates import frame_deltas
from tests.helpers import free_port, make_settings, photo

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
