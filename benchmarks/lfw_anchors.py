"""LFW development fold through one pipeline for every model: our MTCNN -> 5-point alignment -> embed -> cosine.

faceset's models are read from their model cards; the anchor models in ../shared/anchors (other
people's, comparison only, never shipped) get cards built here from anchors/README.md. Prints a
table: 10-fold accuracy (mean ± std), TAR at FAR 1e-2, photos without a face, seconds.

    python benchmarks/lfw_anchors.py [models/default ...] [--anchors ../shared/anchors]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from engines.base import build_engine
from engines.detection import build_detector
from engines.model_card import ModelCard, sha256_file
from engines.pipeline import FacePipeline
from training.evaluate_pipeline import score_pairs, summarise
from training.settings import get_settings

# input conventions from anchors/README.md; output names read off the graphs
ANCHORS = {
    "mobilefacenet-a": {"channel_order": "BGR", "mean": [127.5] * 3, "std": [128.0] * 3, "output": "reshape2_0.tmp_0"},
    "mobilefacenet-b": {"channel_order": "RGB", "mean": [127.5] * 3, "std": [128.0] * 3, "output": "output0"},
}


def anchor_card(anchors: Path, name: str) -> ModelCard:
    spec = ANCHORS[name]
    onnx = anchors / f"{name}.onnx"
    card = ModelCard.model_validate({
        "name": name, "version": "anchor", "architecture": "mobilefacenet", "embedding_size": 128,
        "licence": "not ours: comparison only (see anchors/README.md)",
        "files": {"onnx": {"path": onnx.name, "sha256": sha256_file(onnx)}},
        "input": {"size": 112, "template": "arcface_112", "channel_order": spec["channel_order"], "mean": spec["mean"], "std": spec["std"]},
        "outputs": {"embedding": spec["output"]},
        "provenance": {"source": str(onnx)},
    })
    return card.set_root(anchors)


def run(card: ModelCard, pairs: Path, images: Path, detector) -> dict:
    t0 = time.time()
    pipeline = FacePipeline(detector, build_engine("onnxruntime", card=card), card)
    result = summarise(score_pairs(pipeline, pairs, images))
    return {"model": f"{card.name} ({card.version})", "seconds": time.time() - t0, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cards", nargs="*", type=Path, default=[Path("models/default")])
    ap.add_argument("--anchors", type=Path, default=None, help="folder of the anchor ONNX files (default ../shared/anchors)")
    args = ap.parse_args()
    data = get_settings().data_dir
    anchors = args.anchors or data.parent / "anchors"
    pairs, images = data / "lfw-dev" / "pairs.txt", data / "lfw-dev" / "images"
    cards = [ModelCard.load(c) for c in args.cards]
    cards += [anchor_card(anchors, n) for n in ANCHORS if (anchors / f"{n}.onnx").exists()]
    detector = build_detector("mtcnn")
    rows = [run(c, pairs, images, detector) for c in cards]
    print(f"{'model':40s} {'accuracy %':>16s} {'TAR@FAR=1e-2':>13s} {'no face':>8s} {'s':>6s}")
    for r in rows:
        acc = f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"
        print(f"{r['model']:40s} {acc:>16s} {100 * r['tar_at_far']['0.01']:>12.2f}% {r['photos_without_face']:>8d} {r['seconds']:>6.0f}")


if __name__ == "__main__":
    main()
