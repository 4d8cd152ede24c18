"""Galleries of a million: the approximate index against the exact scan, the API under load, cold starts.

    python benchmarks/gallery_million.py --size 1000000 [--probes 0.05 0.1 0.25 1] [--features runs/open_set/*.npz]

1. The index alone (`service.gallery_index.GalleryIndex`, one thread, as a search worker runs it):
   exact scan against the approximate index (IVF,SQ8, shortlist re-scored exactly) at each probe
   share: searches/s of 200 queries one at a time, recall@10 against exact, build time. Two
   distributions: random unit vectors of the model's size, and, with --features (the default model's
   embeddings of real faces, e.g. benchmarks/open_set.py's), a Gaussian with their mean and covariance
   (real embeddings fill ~26 of the 128 dimensions; random ones fill all).
2. Through the API (`faceset serve`, its own state dir): the random gallery written to Redis by the
   service's store; cold start of a replica from Redis, then (after it wrote its snapshot) from the
   snapshot: seconds from spawning the process to GET /gallery answering with the full count;
   POST /gallery/search p50/p99 with 1 and 16 clients once the approximate index is in; Redis bytes
   per identity.
Prints markdown tables.
"""
from __future__ import annotations

import argparse
import asyncio
import glob
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

import faiss
import httpx
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gallery_search import fill, load
from service_throughput import free_port, start_service

from service.gallery_index import GalleryIndex

DIM = 128


def random_unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)  # (n, D)


def like(features: list[str]):
    """A sampler of unit vectors from a Gaussian with the mean and covariance of these embeddings."""
    e = np.concatenate([np.load(f)["embedding"] for f in features]).astype(np.float64)
    e = e[np.isfinite(e).all(axis=1)]
    mean, chol = e.mean(axis=0), np.linalg.cholesky(np.cov(e.T) + 1e-9 * np.eye(DIM))

    def sample(rng: np.random.Generator, n: int) -> np.ndarray:
        v = (mean + rng.normal(size=(n, DIM)) @ chol.T).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)
    return sample, len(e)


def rate(idx: GalleryIndex, queries: np.ndarray) -> tuple[float, list[list[str]]]:
    t0 = time.perf_counter()
    found = [idx.search_now(q[None], 10)[0] for q in queries]
    return len(queries) / (time.perf_counter() - t0), [[i for i, _ in f] for f in found]


def index_rows(name: str, vectors: np.ndarray, queries: np.ndarray, probes: list[float]) -> list[tuple]:
    n = len(vectors)
    idx = GalleryIndex(DIM, n, 1.0)
    idx.load("0-0", np.arange(n, dtype=np.int64), [f"id{i}" for i in range(n)], vectors)
    exact_rate, truth = rate(idx, queries)
    rows = [(name, n, "exact scan", "", exact_rate, 1.0, 1.0)]
    for probe in probes:
        idx.probe, idx.exact_max, idx.approx_size, idx.approx = probe, 0, 0, None
        t0 = time.perf_counter()
        idx.build()
        built = time.perf_counter() - t0
        sps, found = rate(idx, queries)
        recall = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth, found)])
        rows.append((name, n, idx.describe(), f"{built:.0f}", sps, sps / exact_rate, recall))
    return rows


def cold_start(redis_url: str, prefix: str, gallery: str, n: int) -> float:
    """Seconds from spawning a replica to GET /gallery answering with all `n` identities."""
    t0 = time.perf_counter()
    port = free_port()
    proc = start_service(port, redis_url, prefix)
    try:
        count = httpx.get(f"http://127.0.0.1:{port}/gallery", headers={"X-Gallery": gallery}, timeout=900).json()["count"]
        assert count == n, (count, n)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)


def api_rows(args, prefix: str, gallery: str) -> tuple[list[tuple], dict]:
    n, base_port = args.size, free_port()
    asyncio.run(fill(args.redis_url, prefix, gallery, n))
    r = redis.Redis.from_url(args.redis_url)
    keys = [k for k in r.scan_iter(match=f"{prefix}gal:{{{gallery}}}:*")]
    facts = {"redis_bytes_per_identity": sum(r.memory_usage(k) or 0 for k in keys) / n,
             "cold_from_redis_s": cold_start(args.redis_url, prefix, gallery, n)}
    proc = start_service(base_port, args.redis_url, prefix)  # loads from Redis, builds, writes its snapshot
    base = f"http://127.0.0.1:{base_port}"
    try:
        deadline = time.monotonic() + 3600
        while "IVF" not in httpx.get(f"{base}/gallery", headers={"X-Gallery": gallery}, timeout=900).json()["index"]:
            assert time.monotonic() < deadline, "no approximate index within an hour"
            time.sleep(2)
        snapshots = Path(os.environ["FACESET_STATE_DIR"]) / "galleries"
        while not list(snapshots.glob(f"*-{gallery}.snapshot")):
            time.sleep(1)
        rows = []
        for clients in (1, 16):
            done, lat = asyncio.run(load(base, gallery, clients, args.seconds))
            rows.append((n, clients, done / args.seconds, np.percentile(lat, 50) * 1e3, np.percentile(lat, 99) * 1e3))
    finally:
        proc.terminate()
        proc.wait(60)
    time.sleep(2)  # the snapshot of the last round is in place
    facts["cold_from_snapshot_s"] = cold_start(args.redis_url, prefix, gallery, n)
    facts["snapshot_bytes"] = sum(p.stat().st_size for p in snapshots.glob(f"*-{gallery}.snapshot"))
    return rows, facts


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1_000_000)
    ap.add_argument("--probes", type=float, nargs="*", default=[0.05, 0.1, 0.25, 1.0])
    ap.add_argument("--api-probe", type=float, default=0.25, help="FACESET_GALLERY_PROBE of the served replica")
    ap.add_argument("--features", nargs="*", default=sorted(glob.glob("runs/open_set/*.npz")))
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    ap.add_argument("--skip-api", action="store_true")
    args = ap.parse_args(argv)
    faiss.omp_set_num_threads(1)  # exact and approximate alike, as a search worker runs them (service.gallery)
    rng = np.random.default_rng(0)
    queries = random_unit(np.random.default_rng(1), 200)
    rows = index_rows("random unit", random_unit(rng, args.size), queries, args.probes)
    if args.features:
        sample, count = like(args.features)
        rows += index_rows(f"Gaussian like {count} real", sample(rng, args.size), sample(np.random.default_rng(1), 200),
                           args.probes)
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; {DIM}-d; one search thread\n")
    print("| vectors | identities | index | build (s) | searches/s | × exact | recall@10 |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, n, what, built, sps, speedup, recall in rows:
        print(f"| {name} | {n} | {what} | {built} | {sps:.0f} | {speedup:.1f} | {recall:.3f} |")
    if args.skip_api:
        return
    with tempfile.TemporaryDirectory() as state:
        os.environ.update({"FACESET_STATE_DIR": state, "FACESET_ERASURE_INTERVAL_S": "5",
                           "FACESET_GALLERY_PROBE": str(args.api_probe),
                           "FACESET_GALLERY_EXACT_MAX": str(min(100_000, args.size // 2))})
        prefix = f"faceset-bench-{uuid.uuid4().hex[:6]}:"
        try:
            api, facts = api_rows(args, prefix, "million")
        finally:
            r = redis.Redis.from_url(args.redis_url)
            keys = list(r.scan_iter(match=f"{prefix}*"))
            if keys:
                r.delete(*keys)
    print(f"\nAPI (`faceset serve`, FACESET_GALLERY_EXACT_MAX={os.environ['FACESET_GALLERY_EXACT_MAX']}, "
          f"FACESET_GALLERY_PROBE={args.api_probe:g}), random unit vectors; {args.seconds:g} s per row\n")
    print("| identities | clients | searches/s | p50 ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    for n, clients, sps, p50, p99 in api:
        print(f"| {n} | {clients} | {sps:.1f} | {p50:.1f} | {p99:.1f} |")
    print(f"\nCold start (spawn to GET /gallery with every identity): from Redis {facts['cold_from_redis_s']:.1f} s, "
          f"from the snapshot {facts['cold_from_snapshot_s']:.1f} s (snapshot {facts['snapshot_bytes'] / 1e6:.0f} MB); "
          f"Redis {facts['redis_bytes_per_identity']:.0f} bytes per identity (every key of the gallery, log included)")


if __name__ == "__main__":
    main()
