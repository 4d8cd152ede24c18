"""Open-set identification through the gallery API on identities no model was trained on.

    python benchmarks/gallery_identification.py [--features runs/caface/features/celeba-holdout.npz]

The features are the default model's embeddings of the CelebA calibration hold-out
(training.caface.features; clean crops only here). Half of the identities with 2+ images are
enrolled with their first image (`POST /gallery/{id}` with its embedding); every other image of
every identity with 2+ images is a probe (`POST /gallery/search`): probes of enrolled people are
mated, the rest non-mated. Reported: rank-1 identification rate of mated probes, and at the
card's calibrated FARs the false negative identification rate (a mated probe not identified as
its person) and the false positive identification rate (a non-mated probe identified as anyone).
"""
from __future__ import annotations

import argparse
import sys
import uuid
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from service_throughput import running_service

REPO = Path(__file__).resolve().parents[1]


def split(labels: np.ndarray) -> tuple[dict[int, int], list[tuple[int, int]]]:
    """(enrolled identity -> its enrolment row, [(probe row, identity)]) for identities with 2+ images."""
    rows: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        rows.setdefault(int(y), []).append(i)
    multi = sorted(y for y, r in rows.items() if len(r) >= 2)
    enrolled = {y: rows[y][0] for y in multi[::2]}
    probes = [(i, y) for y in multi for i in rows[y][1 if y in enrolled else 0 :]]
    return enrolled, probes


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--features", default=str(REPO / "runs" / "caface" / "features" / "celeba-holdout.npz"))
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    args = ap.parse_args(argv)
    data = np.load(args.features)
    emb = data["embedding"][:, 0]  # (N, D) raw, clean variant
    enrolled, probes = split(data["labels"])
    prefix = f"faceset-bench-{uuid.uuid4().hex[:6]}:"
    headers = {"X-Gallery": "identification"}
    with running_service(args.redis_url, prefix) as base, httpx.Client(timeout=60) as http:
        for y, row in enrolled.items():
            http.post(f"{base}/gallery/id{y}", json={"embedding": emb[row].tolist()}, headers=headers).raise_for_status()
        fars = [1e-2, 1e-3, 1e-4]  # the default card's calibrated FARs
        results = {far: [] for far in fars}
        for row, y in probes:
            for far in fars:
                r = http.post(f"{base}/gallery/search", json={"embedding": emb[row].tolist(), "top_k": 1, "far": far},
                              headers=headers)
                r.raise_for_status()
                results[far].append((y, r.json()["results"][0]))
    mated = [(y, res) for y, res in results[fars[0]] if y in enrolled]
    rank1 = np.mean([res["matches"][0]["id"] == f"id{y}" for y, res in mated])
    print(f"{len(enrolled)} enrolled identities (one image each), {len(mated)} mated and "
          f"{len(probes) - len(mated)} non-mated probes; default model, clean crops\n")
    print(f"Rank-1 identification rate (mated probes): {100 * rank1:.2f} %\n")
    print("| FAR of the threshold | threshold | FNIR (mated not identified as themselves) | FPIR (non-mated identified) |")
    print("| --- | --- | --- | --- |")
    for far in fars:
        rows = results[far]
        fnir = np.mean([res["identified"] != f"id{y}" for y, res in rows if y in enrolled])
        fpir = np.mean([res["identified"] is not None for y, res in rows if y not in enrolled])
        print(f"| {far:g} | {rows[0][1]['threshold']:.4f} | {100 * fnir:.2f} % | {100 * fpir:.2f} % |")


if __name__ == "__main__":
    main()
