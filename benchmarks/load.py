"""The service under a mixed open-loop workload: the sustainable rate, twice that rate, and a soak.

    python benchmarks/load.py [--quick] [--soak-minutes 10] [--rate R] [--redis-url redis://127.0.0.1:6379/0]

The service runs as `faceset serve` in its own process (its defaults or the FACESET_* variables set, the
Redis given, its keys under a prefix erased afterwards). Requests arrive on a Poisson schedule whatever the answers' latency (an open
loop): 40 % /embed (one LFW photo with one face), 20 % /verify (two photos), 20 %
/templates/{id}/frames (three photos with distinct frame ids, 16 templates), 20 % /gallery/search (one
photo, against a gallery enrolled at start). Latency runs from a request's scheduled send time, so
waiting in the client counts (no coordinated omission); every request has a deadline.

1. Ramp: the rate grows ×1.5 per step until p99 passes --p99-ms or a request fails, then two bisection
   steps; the sustainable rate is the highest step that passed (--rate gives it instead).
2. Mixed workload at the sustainable rate, then at twice it: the service should shed with 429/503
   (no timeouts, no other 5xx), keep its in-flight requests, batcher queue wait and memory bounded,
   and complete what it accepts.
3. Soak at 70 % of the sustainable rate for --soak-minutes, the server's RSS and open file
   descriptors sampled every 10 s: first, last, max and the least-squares slope.
During every phase the server's RSS and fds (/proc/PID) and `faceset_requests_in_flight` (/metrics)
are sampled. Loopback only; every phase is bounded in requests and time. Prints markdown tables.
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import platform
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_throughput import lfw_photos, running_service

MIX = {"/embed": 0.4, "/verify": 0.2, "/templates/{id}/frames": 0.2, "/gallery/search": 0.2}
GALLERY = "bench"
TEMPLATES = 16
FRAMES_PER_REQUEST = 3
REQUEST_DEADLINE_S = 30.0  # a request still unanswered after this counts as "timeout"
ADMISSION_SLOTS = int(os.environ.get("FACESET_MAX_CONCURRENT_REQUESTS", 16))  # the service reads the same
KEEPALIVE_S = 1.0  # under uvicorn's 5 s: a connection the server is closing for idleness is never reused
QUEUE_WAIT = "faceset_batch_queue_wait_seconds"


@dataclass
class Shot:
    route: str
    latency_s: float
    status: str  # the HTTP status, or "timeout" / the transport error's name
    lag_s: float  # how late this client began sending it (its own event loop's delay)


@dataclass
class Sample:
    t: float
    rss_mb: float
    fds: int
    in_flight: float


@dataclass
class Phase:
    name: str
    rate: float
    seconds: float
    shots: list[Shot]
    samples: list[Sample]
    queue_wait_p99_s: float = math.nan


class Workload:
    """Builds each request of the mix from the one-face photos; frame ids never repeat within a run."""

    def __init__(self, photos: list[bytes], seed: int) -> None:
        self.photos, self.rng, self.sent = photos, random.Random(seed), 0
        self.routes, self.weights = list(MIX), list(MIX.values())

    def next(self) -> tuple[str, str, dict]:
        self.sent += 1
        route, pick = self.rng.choices(self.routes, self.weights)[0], self.photo
        if route == "/embed":
            return route, "/embed", {"files": [("images", pick())]}
        if route == "/verify":
            return route, "/verify", {"files": [("a", pick()), ("b", pick())]}
        if route == "/gallery/search":
            return route, "/gallery/search", {"files": [("images", pick())], "headers": {"X-Gallery": GALLERY}}
        ids = [f"{self.sent}-{j}" for j in range(FRAMES_PER_REQUEST)]
        return route, f"/templates/t{self.sent % TEMPLATES}/frames", {
            "files": [("images", pick()) for _ in ids], "data": {"frame_ids": ids}}

    def photo(self) -> tuple[str, bytes, str]:
        return "face.jpg", self.rng.choice(self.photos), "image/jpeg"


def server_pid() -> int:
    """The `faceset serve` child of this process (running_service started it)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == os.getpid() and b"service.cli" in cmdline:
            return int(entry)
    sys.exit("the service process was not found among this process's children")


def metric_families(text: str) -> dict:
    return {f.name: f for f in text_string_to_metric_families(text)}


async def sample(http: httpx.AsyncClient, pid: int, t0: float) -> Sample:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    try:
        families = metric_families((await http.get("/metrics")).text)
        in_flight = families["faceset_requests_in_flight"].samples[0].value - 1  # not this scrape itself
    except (httpx.HTTPError, KeyError, IndexError):
        in_flight = math.nan
    return Sample(time.perf_counter() - t0, rss_kb / 1024, fds, in_flight)


def buckets(text: str) -> dict[float, float]:
    """Cumulative counts of the batcher's queue-wait histogram by upper bound."""
    family = metric_families(text).get(QUEUE_WAIT)
    return {float(s.labels["le"]): s.value for s in family.samples if s.name.endswith("_bucket")} if family else {}


def quantile_bound(before: dict, after: dict, q: float) -> float:
    """The upper bound of the bucket holding quantile q of what was observed between two scrapes."""
    delta = {le: after[le] - before.get(le, 0.0) for le in sorted(after)}
    total = delta.get(math.inf, 0.0)
    return next((le for le, n in delta.items() if total and n >= q * total), math.nan)


async def send(http: httpx.AsyncClient, workload: Workload, scheduled: float, shots: list[Shot]) -> None:
    route, path, kwargs = workload.next()
    lag = time.perf_counter() - scheduled
    try:
        r = await asyncio.wait_for(http.post(path, **kwargs), REQUEST_DEADLINE_S)
        status = str(r.status_code)
    except asyncio.TimeoutError:
        status = "timeout"
    except httpx.HTTPError as exc:
        status = type(exc).__name__
    shots.append(Shot(route, time.perf_counter() - scheduled, status, lag))


async def run_phase(base: str, pid: int, workload: Workload, name: str, rate: float, seconds: float,
                    every_s: float, seed: int) -> Phase:
    """Poisson arrivals at `rate`/s for `seconds` (at most 2× the expected count), sampling every `every_s`."""
    rng = random.Random(seed)
    pool = min(1024, max(2 * ADMISSION_SLOTS, math.ceil(4 * rate)))  # 4 s of arrivals; beyond admission's slots
    limits = httpx.Limits(max_connections=pool, max_keepalive_connections=pool, keepalive_expiry=KEEPALIVE_S)
    shots: list[Shot] = []
    async with httpx.AsyncClient(base_url=base, timeout=REQUEST_DEADLINE_S, limits=limits) as http, \
            httpx.AsyncClient(base_url=base, timeout=10) as probe:
        before = buckets((await probe.get("/metrics")).text)
        t0 = time.perf_counter()
        samples: list[Sample] = []
        sampler = asyncio.create_task(sample_every(probe, pid, t0, every_s, seconds + REQUEST_DEADLINE_S, samples))
        tasks, at = [], t0
        for _ in range(math.ceil(2 * rate * seconds) + 10):
            at += rng.expovariate(rate)
            if at > t0 + seconds:
                break
            await asyncio.sleep(max(0.0, at - time.perf_counter()))
            tasks.append(asyncio.create_task(send(http, workload, at, shots)))
        await asyncio.wait(tasks, timeout=REQUEST_DEADLINE_S + 5)  # each has its own deadline; this bounds the phase
        sampler.cancel()
        samples.append(await sample(probe, pid, t0))
        after = buckets((await probe.get("/metrics")).text)
    return Phase(name, rate, seconds, shots, samples, quantile_bound(before, after, 0.99))


async def sample_every(probe: httpx.AsyncClient, pid: int, t0: float, every_s: float, limit_s: float,
                       samples: list[Sample]) -> None:
    """Samples the server every `every_s` until cancelled (or `limit_s` has passed)."""
    for k in range(math.ceil(limit_s / every_s) + 1):
        await asyncio.sleep(max(0.0, t0 + k * every_s - time.perf_counter()))
        samples.append(await sample(probe, pid, t0))


def ok(shots: list[Shot]) -> list[Shot]:
    return [s for s in shots if s.status == "200"]


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1e3 if values else math.nan


def ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.0f}"


def passes(phase: Phase, p99_ms: float) -> bool:
    return len(ok(phase.shots)) == len(phase.shots) and pct([s.latency_s for s in phase.shots], 99) <= p99_ms


def ramp(run, start: float, p99_ms: float, max_steps: int = 12) -> tuple[float, list[Phase]]:
    """Geometric steps up to the first failing rate, then two bisections; the highest passing rate."""
    steps, good, bad, rate = [], None, None, start
    for _ in range(max_steps):
        steps.append(run(f"ramp {rate:.1f}/s", rate))
        if passes(steps[-1], p99_ms):
            good, rate = rate, rate * 1.5
        else:
            bad = rate
            break
    for _ in range(2 if good and bad else 0):
        rate = math.sqrt(good * bad)
        steps.append(run(f"ramp {rate:.1f}/s", rate))
        good, bad = (rate, bad) if passes(steps[-1], p99_ms) else (good, rate)
    if good is None:
        sys.exit(f"even {start:g} requests/s failed (p99 over {p99_ms:g} ms or errors): lower --start-rate")
    return good, steps


def prepare(base: str, photos: list[bytes], gallery_size: int) -> list[bytes]:
    """The photos with exactly one face; the gallery enrolled with their embeddings and random others."""
    keep, embeddings = [], []
    with httpx.Client(base_url=base, timeout=60) as http:
        for p in photos:
            r = http.post("/embed", files=[("images", ("face.jpg", p, "image/jpeg"))])
            r.raise_for_status()
            faces = r.json()["results"][0]["faces"]
            if len(faces) == 1:
                keep.append(p)
                embeddings.append(faces[0]["embedding"])
        rng = np.random.default_rng(0)
        while len(embeddings) < gallery_size:
            v = rng.standard_normal(len(embeddings[0]))
            embeddings.append((v / np.linalg.norm(v)).tolist())
        for i, e in enumerate(embeddings[:gallery_size]):
            http.post(f"/gallery/id{i}", json={"embedding": e}, headers={"X-Gallery": GALLERY}).raise_for_status()
    return keep


def route_rows(phase: Phase) -> list[str]:
    rows = []
    for route in [*MIX, "all"]:
        shots = [s for s in phase.shots if route in ("all", s.route)]
        if not shots:
            continue
        good = ok(shots)
        refused = [s.latency_s for s in shots if s.status in ("429", "503")]
        errors = Counter(s.status for s in shots if s.status != "200")
        by_status = ", ".join(f"{k}: {100 * n / len(shots):.1f} %" for k, n in sorted(errors.items())) or "none"
        rows.append(f"| {phase.name} | {route} | {len(shots) / phase.seconds:.1f} | {len(good) / phase.seconds:.1f} | "
                    f"{ms(pct([s.latency_s for s in good], 50))} | {ms(pct([s.latency_s for s in good], 99))} | "
                    f"{ms(pct(refused, 99))} | {by_status} |")
    return rows


def server_row(phase: Phase) -> str:
    rss = [s.rss_mb for s in phase.samples]
    fds = [s.fds for s in phase.samples]
    flight = [s.in_flight for s in phase.samples if not math.isnan(s.in_flight)]
    return (f"| {phase.name} | {ms(max(flight, default=math.nan))} | {ms(phase.queue_wait_p99_s * 1e3)} | "
            f"{rss[0]:.0f} / {rss[-1]:.0f} / {max(rss):.0f} | {fds[0]} / {fds[-1]} / {max(fds)} | "
            f"{ms(pct([s.lag_s for s in phase.shots], 99))} |")


def slope_per_min(samples: list[Sample], value) -> float:
    if len(samples) < 2:
        return math.nan
    return float(np.polyfit([s.t / 60 for s in samples], [value(s) for s in samples], 1)[0])


def report(args, photos: list[bytes], steps: list[Phase], sustainable: float, phases: list[Phase]) -> None:
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load generator on the same "
          f"machine; {len(photos)} one-face LFW photos; gallery of {args.gallery_size}; mix "
          + ", ".join(f"{r} {w:.0%}" for r, w in MIX.items()) + f"; p99 bound {args.p99_ms:g} ms\n")
    if steps:
        print("| ramp step (requests/s) | requests | answered 200/s | p50 ms | p99 ms | non-200 | passed |")
        print("| --- | --- | --- | --- | --- | --- | --- |")
        for p in steps:
            lat = [s.latency_s for s in p.shots]
            print(f"| {p.rate:.1f} | {len(p.shots)} | {len(ok(p.shots)) / p.seconds:.1f} | {pct(lat, 50):.0f} | "
                  f"{pct(lat, 99):.0f} | {len(p.shots) - len(ok(p.shots))} | {'yes' if passes(p, args.p99_ms) else 'no'} |")
    print(f"\nSustainable rate: **{sustainable:.1f} requests/s**\n")
    print("| phase | route | offered/s | answered 200/s | p50 ms (200) | p99 ms (200) | p99 ms (429/503) | non-200, % of requests |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for p in phases:
        print("\n".join(route_rows(p)))
    print("\nServer process during each phase (first / last / max):\n")
    print("| phase | requests in flight, max | batcher queue wait p99 ms (bucket bound) | RSS MB | open fds "
          "| load generator's send lag p99 ms |")
    print("| --- | --- | --- | --- | --- | --- |")
    for p in phases:
        print(server_row(p))
    over, soak = phases[1], phases[-1]
    status = Counter(s.status for s in over.shots)
    shed = status["429"] + status["503"]
    other = {k: n for k, n in status.items() if k not in ("200", "429", "503")}
    print(f"\nAt 2× the sustainable rate: {100 * shed / max(1, len(over.shots)):.1f} % shed with 429/503, "
          f"other failures {other or 'none'}; accepted p99 {ms(pct([s.latency_s for s in ok(over.shots)], 99))} ms; "
          f"{ADMISSION_SLOTS} admission slots (FACESET_MAX_CONCURRENT_REQUESTS)")
    late = soak.samples[len(soak.samples) // 2:]  # the second half: past what the overload phase left behind
    rss, fds = (lambda s: s.rss_mb), (lambda s: s.fds)
    print(f"\nSoak ({soak.seconds / 60:g} min, sampled every 10 s): RSS slope {slope_per_min(soak.samples, rss):+.2f} MB/min "
          f"({slope_per_min(late, rss):+.2f} over its second half), fds slope {slope_per_min(soak.samples, fds):+.2f} "
          f"fds/min ({slope_per_min(late, fds):+.2f})")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 8 s ramp steps, 20 s phases, 1-minute soak")
    ap.add_argument("--seconds", type=float, help="seconds of the mixed and overload phases (default 60; quick 20)")
    ap.add_argument("--step-seconds", type=float, help="seconds per ramp step (default 20; quick 8)")
    ap.add_argument("--soak-minutes", type=float, help="soak length (default 10; quick 1)")
    ap.add_argument("--rate", type=float, help="the sustainable rate, skipping the ramp")
    ap.add_argument("--start-rate", type=float, default=4.0, help="first ramp step (requests/s)")
    ap.add_argument("--p99-ms", type=float, default=1000.0, help="a sustainable rate keeps p99 under this")
    ap.add_argument("--photos", type=int, default=64)
    ap.add_argument("--gallery-size", type=int, default=1000)
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds or (20.0 if quick else 60.0)
    args.step_seconds = args.step_seconds or (8.0 if quick else 20.0)
    args.soak_minutes = args.soak_minutes or (1.0 if quick else 10.0)
    from training.settings import get_settings

    prefix = f"faceset-bench-{uuid.uuid4().hex[:6]}:"
    with running_service(args.redis_url, prefix) as base:
        photos = prepare(base, lfw_photos(get_settings().data_dir, args.photos), args.gallery_size)
        pid, workload, seeds = server_pid(), Workload(photos, seed=1), iter(range(100, 1000))

        def run(name: str, rate: float, seconds: float = args.step_seconds, every_s: float = 1.0) -> Phase:
            phase = asyncio.run(run_phase(base, pid, workload, name, rate, seconds, every_s, next(seeds)))
            time.sleep(2)  # let what an overloaded phase left in the server finish before the next one
            return phase

        sustainable, steps = (args.rate, []) if args.rate else ramp(run, args.start_rate, args.p99_ms)
        phases = [run("sustainable", sustainable, args.seconds), run("2× sustainable", 2 * sustainable, args.seconds),
                  run("soak at 70 %", 0.7 * sustainable, args.soak_minutes * 60, every_s=10.0)]
    report(args, photos, steps, sustainable, phases)


if __name__ == "__main__":
    main()
