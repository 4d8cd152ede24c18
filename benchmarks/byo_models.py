"""Bring your own model through the service (issue 13, "How to show it"): import, check, calibrate, serve, verify.

For each anchor model (other people's, read from ../shared/anchors, never copied into the project), as a user runs it:

    faceset model import ANCHOR.onnx --out runs/byo_models/NAME --channel-order … --std 128 --check-with CHECK
    faceset model calibrate runs/byo_models/NAME --holdout HOLDOUT
    FACESET_MODEL_CARD=runs/byo_models/NAME FACESET_FUSION_CARD=none faceset serve

then lfw-dev's 600 pairs through POST /verify?far=1e-3 (multipart a, b). models/default (calibrated on the whole
CelebA hold-out) is served the same way for reference. Each service runs on a free loopback port against the shared
Redis under a key prefix of its own, erased afterwards.

CHECK and HOLDOUT are symlink trees under runs/byo_models/ of the CelebA calibration hold-out (engines.holdout over
celeba-10k-aligned, CelebA-299's people protected: what benchmarks/open_set.py calls celeba-holdout): the check
reads 10 people with 5+ photos, the calibration the first --identities of the others (sorted by name). Thresholds
never come from lfw-dev, cfp-dev or CelebA-299: those only evaluate.

Printed per model: the card's calibration (identities, genuine/impostor pairs) and quality, 10-fold accuracy from the
similarities /verify returns (training.eval.pairs.kfold_accuracy, threshold fitted on the other 9 folds) and the
share of pairs the service's own calibrated threshold at FAR 1e-3 decides correctly. A pair with a photo where no
face is found (422 no_face) scores -1 and counts as "different", as benchmarks/lfw_anchors.py scores it.

    python benchmarks/byo_models.py [--identities 300] [--anchors ../shared/anchors]
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import numpy as np
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lfw_anchors import ANCHORS  # noqa: E402  (the anchors' conventions, anchors/README.md)

from engines.holdout import holdout_names, list_identities  # noqa: E402
from engines.model_card import ModelCard  # noqa: E402
from service_throughput import free_port  # noqa: E402
from training.eval.pairs import Pair, kfold_accuracy, read_pairs  # noqa: E402
from training.settings import get_settings  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "byo_models"
REDIS_URL = "redis://127.0.0.1:6379/0"
FAR = 1e-3
CHECK_PEOPLE = 10  # faceset model import --check-with reads the first 10 people, 5 photos each, by default


def faceset(*args: str) -> str:
    """`faceset ARGS` (python -m service.cli: the same app) in its own process; its output, or exit with it."""
    done = subprocess.run([sys.executable, "-m", "service.cli", *args], cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        sys.exit(f"faceset {' '.join(args)} failed:\n{done.stdout}{done.stderr[-3000:]}")
    return done.stdout


def symlink_tree(root: Path, ids: dict[str, list[Path]]) -> Path:
    for name, paths in ids.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for p in paths:
            if not (root / name / p.name).exists():
                (root / name / p.name).symlink_to(p)
    return root


def celeba_holdout(data: Path, identities: int) -> tuple[Path, Path, int]:
    """(check tree, calibration tree, calibration photos) from the CelebA calibration hold-out."""
    ids = list_identities(data / "celeba-10k-aligned")
    names = sorted(holdout_names(ids, protected=list_identities(data / "celeba-299"), every=3, min_images=2))
    check = [n for n in names if len(ids[n]) >= 5][:CHECK_PEOPLE]
    calib = [n for n in names if n not in check][:identities]
    tag = f"holdout-{identities}"
    return (symlink_tree(WORK / "check", {n: ids[n] for n in check}),
            symlink_tree(WORK / tag, {n: ids[n] for n in calib}), sum(len(ids[n]) for n in calib))


@contextmanager
def serving(card: Path):
    """`faceset serve` of `card` on a free loopback port (no fusion model, the shared Redis under a prefix of its
    own, erased afterwards): yields the base URL."""
    port, prefix = free_port(), f"faceset-byo-{uuid.uuid4().hex[:6]}:"
    env = {**os.environ, "FACESET_MODEL_CARD": str(card), "FACESET_FUSION_CARD": "none", "FACESET_REDIS_URL": REDIS_URL,
           "FACESET_KEY_PREFIX": prefix, "FACESET_LOG_LEVEL": "warning"}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while not _ready(base):
            if proc.poll() is not None:
                sys.exit(f"faceset serve exited: {proc.stderr.read().decode()[-2000:]}")
            if time.monotonic() > deadline:
                sys.exit("faceset serve was not ready within 90 s")
            time.sleep(0.3)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)
        client = redis.Redis.from_url(REDIS_URL)
        keys = list(client.scan_iter(match=f"{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def _ready(base: str) -> bool:
    try:
        return httpx.get(f"{base}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def verify_pairs(base: str, pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray, int, float]:
    """(similarity per pair, the service's match per pair, pairs without a face, threshold used) of /verify at FAR."""
    def one(http: httpx.Client, pair: Pair) -> tuple[float, bool, float | None]:
        files = {"a": ("a.jpg", pair.path_a.read_bytes(), "image/jpeg"),
                 "b": ("b.jpg", pair.path_b.read_bytes(), "image/jpeg")}
        r = http.post(f"{base}/verify", params={"far": FAR}, files=files)
        if r.status_code == 422 and r.json()["error"]["code"] == "no_face":
            return -1.0, False, None
        r.raise_for_status()
        body = r.json()
        return body["similarity"], body["match"], body["threshold"]

    with httpx.Client(timeout=120) as http, ThreadPoolExecutor(4) as pool:  # 4 in flight: the batcher groups them
        rows = list(pool.map(lambda p: one(http, p), pairs))
    thresholds = {t for *_, t in rows if t is not None}
    return (np.array([s for s, *_ in rows]), np.array([m for _, m, _ in rows]), sum(t is None for *_, t in rows),
            min(thresholds) if len(thresholds) == 1 else float("nan"))  # one threshold unless the card has bands


def measure(card_dir: Path, pairs: list[Pair]) -> dict:
    t0 = time.time()
    with serving(card_dir) as base:
        scores, match, no_face, threshold = verify_pairs(base, pairs)
    issame = np.array([p.issame for p in pairs])
    k = kfold_accuracy(scores, issame, np.array([p.fold for p in pairs]))
    return {"accuracy": 100 * k.mean, "std": 100 * k.std, "decided": 100 * np.mean(match == issame),
            "false_accepts": int(np.sum(match & ~issame)), "false_rejects": int(np.sum(~match & issame)),
            "threshold": threshold, "no_face": no_face, "seconds": time.time() - t0}


def import_and_calibrate(anchors: Path, name: str, check: Path, holdout: Path, dataset: str) -> Path:
    out, c = WORK / name, ANCHORS[name]
    shutil.rmtree(out, ignore_errors=True)  # a fresh import each run: the calibration below rewrites the card
    print(f"$ faceset model import {name}.onnx --channel-order {c.channel_order} --mean {c.mean[0]:g} --std {c.std[0]:g} "
          f"--check-with {check.relative_to(REPO)}")
    print(faceset("model", "import", str(anchors / f"{name}.onnx"), "--out", str(out), "--name", name,
                  "--channel-order", c.channel_order, "--mean", f"{c.mean[0]:g}", "--std", f"{c.std[0]:g}",
                  "--flip-tta" if c.flip_tta else "--no-flip-tta", "--check-with", str(check),
                  "--licence", "not ours: comparison only (see anchors/README.md)"))
    t0 = time.time()
    print(f"$ faceset model calibrate {out.relative_to(REPO)} --holdout {holdout.relative_to(REPO)}")
    print(faceset("model", "calibrate", str(out), "--holdout", str(holdout), "--dataset", dataset), end="")
    print(f"({time.time() - t0:.0f} s)\n")
    return out


# what the anchors' README gives (full LFW View 2, YuNet + arcface alignment) and benchmarks/RESULTS.md's pipeline rows
PUBLISHED = {"mobilefacenet-a": "99.48 ± 0.35", "mobilefacenet-b": "99.03 ± 0.44"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--identities", type=int, default=300, help="CelebA hold-out identities the calibration reads")
    ap.add_argument("--anchors", type=Path, default=None, help="folder of the anchor ONNX files (default ../shared/anchors)")
    args = ap.parse_args()
    data = get_settings().data_dir
    anchors = args.anchors or data.parent / "anchors"
    check, holdout, photos = celeba_holdout(data, args.identities)
    dataset = f"CelebA calibration hold-out, first {args.identities} identities ({photos} photos; benchmarks/byo_models.py)"
    pairs = read_pairs(data / "lfw-dev" / "pairs.txt", data / "lfw-dev" / "images")
    cards = {"faceset default (models/default)": REPO / "models" / "default"}
    cards |= {f"{n} (imported)": import_and_calibrate(anchors, n, check, holdout, dataset) for n in ANCHORS}
    print(f"lfw-dev: {len(pairs)} pairs through POST /verify?far={FAR:g}, 10 folds\n")
    rows = [(label, ModelCard.load(d), measure(d, pairs)) for label, d in cards.items()]
    for label, card, _ in rows:
        print(f"{label} calibrated on: {card.calibration.dataset}")
    print("\n| model | calibration pairs, genuine / impostor | quality | LFW dev accuracy % (10-fold, /verify "
          "similarities) | /verify at FAR 1e-3: correct % (false accepts / rejects; threshold) | no face "
          "| anchors' README (LFW View 2) | s |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for label, card, r in rows:
        c = card.calibration
        quality = "null" if card.quality is None else \
            f"{card.quality.method} (ERC check used: {any(q.used for q in c.quality_checks)})"
        threshold = "by quality band" if np.isnan(r["threshold"]) else f"{r['threshold']:.3f}"
        print(f"| {label} | {c.positive_pairs:,} / {c.negative_pairs:,} | {quality} | {r['accuracy']:.2f} ± {r['std']:.2f} "
              f"| {r['decided']:.2f} ({r['false_accepts']} / {r['false_rejects']}; {threshold}) | {r['no_face']} "
              f"| {PUBLISHED.get(card.name, '-')} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
