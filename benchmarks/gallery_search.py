"""Gallery 1:N search through the API as the gallery grows, and what a replica pays to load it cold.

    python benchmarks/gallery_search.py [--sizes 1000 10000 100000] [--seconds 5] [--redis-url redis://127.0.0.1:6379/0]

The service runs as `faceset serve` in its own process. Each gallery is filled with random unit
embeddings written straight to Redis by the service's own store (the Lua put: hash + change log);
the service's replica then loads it on its first read (timed: the cold load), and clients query it
with embeddings (`POST /gallery/search`, top 5) in a closed loop. Also: Redis bytes per identity.
Prints markdown tables.
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
import redis.asyncio as aioredis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_throughput import running_service

from service.gallery_store import GalleryStore, Photos

DIM = 128


async def fill(url: str, prefix: str, gallery: str, n: int) -> None:
    client = aioredis.from_url(url)
    store = GalleryStore(client, prefix, DIM)
    rng = np.random.default_rng(0)
    for start in range(0, n, 1000):
        vectors = rng.normal(size=(min(1000, n - start), DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        chunks = np.array_split(np.arange(len(vectors)), 32)  # 32 connections, each writing its share in turn

        await asyncio.gather(*(_write(store, gallery, start, vectors, rows) for rows in chunks))
    await client.aclose()


async def _write(store: GalleryStore, gallery: str, start: int, vectors: np.ndarray, rows: np.ndarray) -> None:
    for i in rows:
        await store.put(gallery, f"id{start + i}", vectors[i], Photos(1, float("nan")))


async def load(base: str, gallery: str, clients: int, seconds: float) -> tuple[int, list[float]]:
    rng = np.random.default_rng(1)
    queries = rng.normal(size=(64, DIM))
    latencies: list[float] = []
    stop = time.perf_counter() + seconds

    async def client(k: int, http: httpx.AsyncClient) -> None:
        i = k
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await http.post(f"{base}/gallery/search", json={"embedding": queries[i % 64].tolist(), "top_k": 5},
                                headers={"X-Gallery": gallery})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)
            i += clients

    async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=clients)) as http:
        await asyncio.gather(*(client(k, http) for k in range(clients)))
    return len(latencies), latencies


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args(argv)
    prefix = f"faceset-bench-{uuid.uuid4().hex[:6]}:"
    r = redis.Redis.from_url(args.redis_url)
    rows = []
    with running_service(args.redis_url, prefix) as base:
        for n in args.sizes:
            gallery = f"bench{n}"
            t0 = time.perf_counter()
            asyncio.run(fill(args.redis_url, prefix, gallery, n))
            filled = time.perf_counter() - t0
            t0 = time.perf_counter()
            count = httpx.get(f"{base}/gallery", headers={"X-Gallery": gallery}, timeout=600).json()["count"]
            cold = time.perf_counter() - t0
            emb_key, log_key = f"{prefix}gal:{{{gallery}}}:emb", f"{prefix}gal:{{{gallery}}}:log"
            per_id = (r.memory_usage(emb_key) or 0) / n
            log_bytes = r.memory_usage(log_key) or 0
            for clients in args.clients:
                done, lat = asyncio.run(load(base, gallery, clients, args.seconds))
                rows.append((n, count, n / filled, cold, per_id, log_bytes, clients, done / args.seconds,
                             np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3))
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; Redis {r.info()['redis_version']} "
          f"local; FAISS exact inner product (CPU); {DIM}-d; {args.seconds:g} s per row\n")
    print("| identities | writes/s (Lua put, 32 connections) | cold load of a replica (s) | Redis bytes per identity (hash) | change log (bytes) | clients | searches/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for n, count, wps, cold, per_id, log_bytes, clients, sps, p50, p99 in rows:
        assert count == n, (count, n)
        print(f"| {n} | {wps:.0f} | {cold:.2f} | {per_id:.0f} | {log_bytes} | {clients} | {sps:.1f} | {p50:.1f} | {p99:.1f} |")


if __name__ == "__main__":
    main()
