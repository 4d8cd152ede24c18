"""LFW development fold through one pipeline for every model: our MTCNN -> 5-point alignment -> embed -> cosine.

faceset's models are read from their model cards; the anchor models in ../shared/anchors (other
people's, comparison only, never shipped) get their cards as `faceset model import` makes them
(engines.model_import.card_for_onnx), with the conventions anchors/README.md states. Prints a
table: 10-fold accuracy (mean ± std), TAR at FAR 1e-2, photos without a face, seconds; with --cfp
also on cfp-dev's frontal-profile pairs (700, 10 balanced folds).

    python benchmarks/lfw_anchors.py [models/default ...] [--anchors ../shared/anchors] [--cfp]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from engines.base import build_engine
from engines.detection import build_detector
from engines.model_card import ModelCard
from engines.model_import import Conventions, card_for_onnx
from engines.pipeline import FacePipeline
from training.eval.pairs import Pair, read_pairs
from training.evaluate_pipeline import score_pair_list, summarise
from training.settings import get_settings

# input conventions from anchors/README.md (sizes and outputs come from the graphs)
ANCHORS = {
    "mobilefacenet-a": Conventions("BGR", (127.5,) * 3, (128.0,) * 3),
    "mobilefacenet-b": Conventions("RGB", (127.5,) * 3, (128.0,) * 3),
}


def anchor_card(anchors: Path, name: str) -> ModelCard:
    return card_for_onnx(anchors / f"{name}.onnx", ANCHORS[name], name, version="anchor",
                         licence="not ours: comparison only (see anchors/README.md)")


def cfp_pairs(root: Path) -> list[Pair]:
    """cfp-dev's frontal-profile pairs: lines 'Images/a.jpg Images/b.jpg 1|0' (no folds: balanced ones are made)."""
    rows = [line.split() for line in (root / "pairs_fp.txt").read_text().splitlines() if line.strip()]
    return [Pair(root / a, root / b, same == "1", 0) for a, b, same in rows]


def run(card: ModelCard, pairs: list[Pair], detector) -> dict:
    t0 = time.time()
    pipeline = FacePipeline(detector, build_engine("onnxruntime", card=card), card)
    result = summarise(score_pair_list(pipeline, pairs))
    return {"model": f"{card.name} ({card.version})", "seconds": time.time() - t0, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cards", nargs="*", type=Path, default=[Path("models/default")])
    ap.add_argument("--anchors", type=Path, default=None, help="folder of the anchor ONNX files (default ../shared/anchors)")
    ap.add_argument("--cfp", action="store_true", help="also cfp-dev's frontal-profile pairs")
    args = ap.parse_args()
    data = get_settings().data_dir
    anchors = args.anchors or data.parent / "anchors"
    sets = {"lfw-dev": read_pairs(data / "lfw-dev" / "pairs.txt", data / "lfw-dev" / "images")}
    if args.cfp:
        sets["cfp-dev FP"] = cfp_pairs(data / "cfp-dev")
    cards = [ModelCard.load(c) for c in args.cards]
    cards += [anchor_card(anchors, n) for n in ANCHORS if (anchors / f"{n}.onnx").exists()]
    detector = build_detector("mtcnn")
    for name, pairs in sets.items():
        rows = [run(c, pairs, detector) for c in cards]
        print(f"{name + ': model':40s} {'accuracy %':>16s} {'TAR@FAR=1e-2':>13s} {'no face':>8s} {'s':>6s}")
        for r in rows:
            acc = f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"
            print(f"{r['model']:40s} {acc:>16s} {100 * r['tar_at_far']['0.01']:>12.2f}% {r['photos_without_face']:>8d} {r['seconds']:>6.0f}")


if __name__ == "__main__":
    main()
