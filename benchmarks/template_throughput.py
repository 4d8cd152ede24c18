"""CAFace templates under load: frame appends/s and latency through the API with the real Redis,
and the Redis memory a template takes as its frame count grows.

    python benchmarks/template_throughput.py [--seconds 10] [--clients 1 16] [--redis-url redis://127.0.0.1:6379/0]

The service runs as `faceset serve` in its own process. Each client appends one frame per request
to its own template (a closed loop), either as an image (decode, detect, align, embed, fuse: the
whole path) or as a precomputed embedding + style statistics (the template path alone: fusion's
assign graph, the Redis Lua append, the aggregate graph). Memory: Redis's MEMORY USAGE of a
template's keys after 10 … 10,000 frames, with and without frame ids. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import sys
import time
import uuid
from pathlib import Path

import httpx
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_throughput import lfw_photos, running_service


async def load(base: str, make_request, clients: int, seconds: float, tag: str) -> tuple[int, list[float], int]:
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        nonlocal errors
        i = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await http.post(f"{base}/templates/bench-{tag}-{k}/frames", **make_request(k, i))
            latencies.append(time.perf_counter() - t0)
            errors += r.status_code != 200 or r.json()["accepted"] != 1
            i += 1

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    return len(latencies), latencies, errors


def precomputed_frames(base: str, photos: list[bytes]) -> list[dict]:
    r = httpx.post(f"{base}/embed", params={"include_style": True, "max_faces": 1},
                   files=[("images", p) for p in photos[:16]], timeout=120)
    faces = [res["faces"][0] for res in r.json()["results"] if res["faces"]]
    return [{"embedding": f["embedding"], "magnitude": f["magnitude"], "style": f["style"]} for f in faces]


def memory_growth(base: str, frames: list[dict], redis_url: str, prefix: str, with_ids: bool) -> list[tuple[int, int, int]]:
    """(frames, bytes of the memory hash, bytes of the frame-id window) as one template grows."""
    r = redis.Redis.from_url(redis_url)
    tid = f"bench-memory-{'ids' if with_ids else 'noids'}-{uuid.uuid4().hex[:6]}"
    rows, total = [], 0
    for target in (10, 100, 1000, 10000):
        while total < target:
            n = min(32, target - total)  # the service's max images per request
            batch = [dict(frames[(total + j) % len(frames)], **({"frame_id": f"f{total + j}"} if with_ids else {}))
                     for j in range(n)]
            httpx.post(f"{base}/templates/{tid}/frames", json={"frames": batch}, timeout=120).raise_for_status()
            total += n
        key = f"{prefix}tpl:{{{tid}}}"
        rows.append((total, int(r.memory_usage(key) or 0), int(r.memory_usage(f"{key}:ids") or 0)))
    httpx.delete(f"{base}/templates/{tid}")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args(argv)
    from training.settings import get_settings

    photos = lfw_photos(get_settings().data_dir, 64)
    prefix = f"faceset-bench-{uuid.uuid4().hex[:6]}:"
    rows = []
    with running_service(args.redis_url, prefix) as base:
        frames = precomputed_frames(base, photos)
        kinds = {
            "precomputed embedding + style": lambda k, i: {"json": {"frames": [frames[(k + i) % len(frames)]]}},
            "image (whole path)": lambda k, i: {"files": [("images", ("f.jpg", photos[(k + i) % len(photos)], "image/jpeg"))]},
        }
        for kind, make in kinds.items():
            for clients in args.clients:
                n, lat, errors = asyncio.run(load(base, make, clients, args.seconds, f"{clients}-{kind[:3]}"))
                rows.append((kind, clients, n / args.seconds, np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3, errors))
        growth = {ids: memory_growth(base, frames, args.redis_url, prefix, ids) for ids in (False, True)}
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Redis {redis.Redis.from_url(args.redis_url).info()['redis_version']} "
          f"on the same machine; {args.seconds:g} s per row\n")
    print("| frames sent as | clients | appends/s | p50 ms | p99 ms | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, clients, rate, p50, p99, errors in rows:
        print(f"| {kind} | {clients} | {rate:.1f} | {p50:.1f} | {p99:.1f} | {errors} |")
    print("\n| frames in the template | memory hash (bytes), no frame ids | memory hash (bytes), with frame ids | frame-id window (bytes) |")
    print("| --- | --- | --- | --- |")
    for (n, plain, _), (_, hashed, window) in zip(growth[False], growth[True]):
        print(f"| {n} | {plain} | {hashed} | {window} |")


if __name__ == "__main__":
    main()
