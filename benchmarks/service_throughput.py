"""The HTTP service under load: /embed with one face per image from 1, 4 and 16 concurrent clients,
compared with the raw engine on the same aligned faces, all in one run.

    python benchmarks/service_throughput.py [--seconds 10] [--clients 1 4 16] [--redis-url redis://127.0.0.1:6379/0]

The service runs as `faceset serve` in its own process (its defaults, the Redis given); clients are
asyncio tasks in this process, each sending its next request when the last one is answered. The
engine rows run the same crops (MTCNN-aligned LFW photos) through the model card's engine in this
process, with the card's flip TTA, so "service / engine" is the share of the engine's throughput
a single-face HTTP request reaches (the rest is decoding, detection, alignment and HTTP).
Prints markdown tables; nothing is asserted.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import redis
from PIL import Image

from engines.base import build_engine, embed_aligned
from engines.detection import build_detector
from engines.model_card import ModelCard
from engines.pipeline import FacePipeline

REPO = Path(__file__).resolve().parents[1]


def lfw_photos(data_dir: Path, n: int) -> list[bytes]:
    paths = sorted((data_dir / "lfw-dev" / "images").glob("*.jpg"))[:n]
    if not paths:
        sys.exit(f"no LFW photos under {data_dir}/lfw-dev/images (set FACESET_DATA_DIR)")
    return [p.read_bytes() for p in paths]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_service(redis_url: str, prefix: str | None = None):
    """`faceset serve` on a free port (its keys under `prefix`, erased afterwards): yields its base URL."""
    port = free_port()
    service = start_service(port, redis_url, prefix)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        service.terminate()
        service.wait(30)
        if prefix:
            client = redis.Redis.from_url(redis_url)
            keys = list(client.scan_iter(match=f"{prefix}*"))
            if keys:
                client.delete(*keys)


def start_service(port: int, redis_url: str, prefix: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "FACESET_REDIS_URL": redis_url, "FACESET_LOG_LEVEL": "warning"}
    if prefix:
        env["FACESET_KEY_PREFIX"] = prefix
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    sys.exit(f"the service did not become ready: {proc.stderr.read().decode()[-2000:]}")


async def load(url: str, photos: list[bytes], clients: int, seconds: float) -> tuple[int, list[float], int]:
    """(answered requests, latencies in s, errors) of `clients` closed-loop clients for `seconds`."""
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop:
            data = photos[i % len(photos)]
            t0 = time.perf_counter()
            r = await http.post(url, files=[("images", ("face.jpg", data, "image/jpeg"))])
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200 or len(r.json()["results"][0]["faces"]) != 1  # each photo has one face
            i += clients

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    return len(latencies), latencies, errors


def engine_rate(card: ModelCard, crops: np.ndarray, batch: int, seconds: float) -> float:
    """Faces/s of the card's engine (default threads, flip TTA as the card says) on aligned crops."""
    engine = build_engine("onnxruntime", card=card, max_batch_size=max(batch * 2, 2))
    reps = np.resize(np.arange(len(crops)), batch)
    x = crops[reps]
    embed_aligned(engine, card, x)  # warm-up
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        embed_aligned(engine, card, x)
        n += batch
    return n / (time.perf_counter() - t0)


def one_face_photos(card: ModelCard, photos: list[bytes]) -> tuple[list[bytes], np.ndarray, float]:
    """The photos with exactly one face, their MTCNN-aligned crops, and the detector's photos/s (1 thread)."""
    import io

    pipeline = FacePipeline(build_detector("mtcnn"), None, card)
    images = [np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in photos]
    t0 = time.perf_counter()
    dets = [pipeline.detect(img) for img in images]
    rate = len(images) / (time.perf_counter() - t0)
    keep = [i for i, d in enumerate(dets) if len(d) == 1]
    crops = np.concatenate([pipeline.align(images[i], dets[i]) for i in keep])
    return [photos[i] for i in keep], crops, rate


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--card", default=str(REPO / "models" / "default"))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args(argv)
    from training.settings import get_settings

    card = ModelCard.load(args.card)
    photos = lfw_photos(get_settings().data_dir, args.photos)
    photos, crops, detect_rate = one_face_photos(card, photos)
    rows = []
    with running_service(args.redis_url) as base:
        url = f"{base}/embed"
        asyncio.run(load(url, photos, 2, 2.0))  # warm-up
        for clients in args.clients:
            n, lat, errors = asyncio.run(load(url, photos, clients, args.seconds))
            rows.append((clients, n / args.seconds, np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3, errors))
    engine = {b: engine_rate(card, crops, b, args.seconds / 2) for b in (1, 16)}
    best = max(engine.values())
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; model {card.name} {card.version} "
          f"({card.input.size}px, flip TTA {card.flip_tta}); {len(photos)} LFW photos, one face each; "
          f"{args.seconds:g} s per row\n")
    print("| clients | requests/s | p50 ms | p99 ms | errors | service / engine (best batch) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for clients, rps, p50, p99, errors in rows:
        print(f"| {clients} | {rps:.1f} | {p50:.1f} | {p99:.1f} | {errors} | {rps / best:.2f} |")
    print(f"\nEngine alone on the same aligned crops (faces/s, flip TTA): batch 1 {engine[1]:.1f}, batch 16 {engine[16]:.1f}; "
          f"MTCNN detection alone, 1 thread: {detect_rate:.1f} photos/s")


if __name__ == "__main__":
    main()
