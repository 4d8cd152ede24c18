"""LFW development fold through one pipeline for every model: our MTCNN -> 5-point alignment -> embed -> cosine.

faceset's models are read from their model cards; the anchor models in ../shared/anchors (other
people's, comparison only, never shipped) get their cards as `faceset model import` makes them
(engines.model_import.card_for_onnx), with the conventions anchors/README.md states. Prints a
table: 10-fold accuracy (mean ± std), TAR at FAR 1e-2, photos without a face, seconds; with --cfp
also on cfp-dev's frontal-profile pairs (700, 10 balanced folds).

--detectors mtcnn,yunet runs every model once per detector, the rest of the pipeline (alignment to the card's
template, engine, protocol) unchanged: whether a gap to the anchors' README figures (YuNet + arcface alignment
on the ten LFW View-2 folds) is our detector or our single fold. YuNet is the anchors' `yunet.onnx`, run through
cv2.FaceDetectorYN and read from the anchors folder at run time: a benchmark-only detector, never shipped.

    python benchmarks/lfw_anchors.py [models/default ...] [--anchors ../shared/anchors] [--cfp] [--detectors mtcnn,yunet]
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np

from engines.base import build_engine
from engines.detection import Detection, build_detector
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


class YuNet:
    """The anchors' YuNet (OpenCV model zoo) as a faceset detector: RGB photo in, faces largest first out.

    YuNet's rows are (x, y, w, h, right eye, left eye, nose, right mouth corner, left mouth corner, score), the eyes
    and corners the person's: their right eye is the one on the image's left, so the order is already ours
    (left/right as seen in the image, engines.detection.LANDMARK_NAMES)."""

    def __init__(self, onnx: Path, score_threshold: float = 0.6, nms_threshold: float = 0.3) -> None:
        self.net = cv2.FaceDetectorYN.create(str(onnx), "", (320, 320), score_threshold, nms_threshold, 5000)

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        h, w = image_rgb.shape[:2]
        self.net.setInputSize((w, h))
        _, rows = self.net.detect(np.ascontiguousarray(image_rgb[..., ::-1]))  # YuNet reads BGR
        found = [Detection((float(r[0]), float(r[1]), float(r[0] + r[2]), float(r[1] + r[3])), float(r[14]),
                           np.asarray(r[4:14], np.float64).reshape(5, 2)) for r in (rows if rows is not None else [])]
        return sorted(found, key=lambda d: d.area, reverse=True)


def detectors(names: str, anchors: Path) -> dict:
    made = {"mtcnn": lambda: build_detector("mtcnn"), "yunet": lambda: YuNet(anchors / "yunet.onnx")}
    return {n: made[n]() for n in names.split(",")}


def cfp_pairs(root: Path) -> list[Pair]:
    """cfp-dev's frontal-profile pairs: lines 'Images/a.jpg Images/b.jpg 1|0' (no folds: balanced ones are made)."""
    rows = [line.split() for line in (root / "pairs_fp.txt").read_text().splitlines() if line.strip()]
    return [Pair(root / a, root / b, same == "1", 0) for a, b, same in rows]


def run(card: ModelCard, pairs: list[Pair], detector, label: str = "") -> dict:
    t0 = time.time()
    pipeline = FacePipeline(detector, build_engine("onnxruntime", card=card), card)
    result = summarise(score_pair_list(pipeline, pairs))
    return {"model": f"{card.name} ({card.version}){label}", "seconds": time.time() - t0, **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("cards", nargs="*", type=Path, default=[Path("models/default")])
    ap.add_argument("--anchors", type=Path, default=None, help="folder of the anchor ONNX files (default ../shared/anchors)")
    ap.add_argument("--cfp", action="store_true", help="also cfp-dev's frontal-profile pairs")
    ap.add_argument("--detectors", default="mtcnn", help="comma-separated: mtcnn (ours), yunet (the anchors' "
                    "yunet.onnx, benchmark only)")
    args = ap.parse_args()
    data = get_settings().data_dir
    anchors = args.anchors or data.parent / "anchors"
    sets = {"lfw-dev": read_pairs(data / "lfw-dev" / "pairs.txt", data / "lfw-dev" / "images")}
    if args.cfp:
        sets["cfp-dev FP"] = cfp_pairs(data / "cfp-dev")
    cards = [ModelCard.load(c) for c in args.cards]
    cards += [anchor_card(anchors, n) for n in ANCHORS if (anchors / f"{n}.onnx").exists()]
    found = detectors(args.detectors, anchors)
    for name, pairs in sets.items():
        rows = [run(c, pairs, d, f" {k}" if len(found) > 1 else "") for c in cards for k, d in found.items()]
        print(f"{name + ': model':40s} {'accuracy %':>16s} {'TAR@FAR=1e-2':>13s} {'no face':>8s} {'s':>6s}")
        for r in rows:
            acc = f"{100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f}"
            print(f"{r['model']:40s} {acc:>16s} {100 * r['tar_at_far']['0.01']:>12.2f}% {r['photos_without_face']:>8d} {r['seconds']:>6.0f}")


if __name__ == "__main__":
    main()
