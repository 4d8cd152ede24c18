"""MTCNN face detection over ONNX Runtime, in numpy: no torch at run time.

Zhang et al., "Joint Face Detection and Alignment Using Multitask Cascaded Convolutional
Networks" (IEEE SPL 2016). The ONNX files and their card come from training/convert/mtcnn.py.

The cascade, for an image of side min(H, W):
  1. pyramid: scales s_k = (12 / min_face)·factor^k while min(H, W)·s_k ≥ 12. PNet reads every
     12×12 window of each scaled image with stride 2; a cell (i, j) scoring ≥ t1 proposes the box
     (2j, 2i, 2j + 12, 2i + 12) / s. NMS (IoU 0.5) per scale, then (IoU 0.7) over all scales.
  2. each box is moved by its offsets, b' = b + δ·(w, h, w, h), made square around its centre,
     cut out (zeros outside the image) and resized to 24×24; RNet keeps scores ≥ t2, NMS 0.7,
     regression, square.
  3. the same with 48×48 crops into ONet, which also gives the landmarks as fractions of the crop;
     scores ≥ t3 are kept, boxes regressed, and NMS 0.7 with the "min" overlap
     (intersection / smaller area) drops boxes nested inside a better one.
Defaults (t = 0.6, 0.7, 0.7, min face 20 px, factor 0.709) are the card's, i.e. the paper's code.

Where we differ from the reference code, on purpose: each pyramid level maps back with its exact
per-axis scale (ceil(H·s)/H) rather than s, and crops are resized with area averaging (cv2.INTER_AREA)
rather than bilinear, which aliases when a large face is shrunk to 24 or 48 pixels.
"""
from __future__ import annotations

import math
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import cv2
import numpy as np
import onnxruntime as ort
import yaml

from engines.atomic import sha256_file
from engines.detection import DETECTORS, Detection

DEFAULT_MODEL_DIR = Path(files("faceset_models")) / "detector"  # the shipped detector, in a checkout or a wheel
PNET_CELL, PNET_STRIDE = 12, 2


def pyramid_scales(height: int, width: int, min_face_size: float, factor: float) -> list[float]:
    """Scales at which a face of min_face_size px, then larger by 1/factor each level, spans PNet's 12 px."""
    if min_face_size <= 0 or not 0 < factor < 1:
        raise ValueError(f"need min_face_size > 0 and 0 < factor < 1, got {min_face_size}, {factor}")
    scales, scale = [], PNET_CELL / min_face_size
    while min(height, width) * scale >= PNET_CELL:
        scales.append(scale)
        scale *= factor
    return scales


def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, best score first.

    Take the best remaining box, drop every remaining box whose overlap with it is > threshold,
    repeat. Overlap: "union" = |A∩B| / |A∪B| (IoU), "min" = |A∩B| / min(|A|, |B|).
    Boxes are (N, 4) x1, y1, x2, y2 with area (x2 − x1)(y2 − y1). Ties keep the lower index first.
    """
    if mode not in ("union", "min"):
        raise ValueError(f"mode must be 'union' or 'min', got {mode!r}")
    order = np.argsort(-np.asarray(scores), kind="stable")
    x1, y1, x2, y2 = (np.asarray(boxes, dtype=np.float64)[:, k] for k in range(4))
    areas = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    keep = []
    while order.size:
        best, rest = order[0], order[1:]
        keep.append(best)
        inter = np.maximum(np.minimum(x2[best], x2[rest]) - np.maximum(x1[best], x1[rest]), 0)
        inter *= np.maximum(np.minimum(y2[best], y2[rest]) - np.maximum(y1[best], y1[rest]), 0)
        if mode == "union":
            denom = areas[best] + areas[rest] - inter
        else:
            denom = np.minimum(areas[best], areas[rest])
        # degenerate (zero-area) pairs have inter = 0, so they count as not overlapping
        order = rest[inter <= threshold * np.maximum(denom, 1e-12)]
    return np.asarray(keep, dtype=np.int64)


def regress(boxes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """b' = b + δ·(w, h, w, h): the networks predict corner offsets in units of the box size."""
    size = np.stack([boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)  # (N, 2)
    return boxes + offsets * np.tile(size, 2)  # (N, 4)


def square(boxes: np.ndarray) -> np.ndarray:
    """The square of side max(w, h) with the same centre (the networks were trained on square crops)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2  # (N, 2)
    half = np.max(boxes[:, 2:] - boxes[:, :2], axis=1, keepdims=True) / 2  # (N, 1)
    return np.concatenate([centre - half, centre + half], axis=1)


def crop_windows(image: np.ndarray, boxes: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cut every box out of the image (zeros where it leaves the image) and resize to size×size.

    Returns crops (N, size, size, 3) uint8, and the integer origin (N, 2) and extent (N, 2) in
    image pixels of what was cut, which the landmarks are relative to.
    """
    height, width = image.shape[:2]
    origin = np.floor(boxes[:, :2]).astype(np.int64)  # (N, 2) x0, y0
    extent = np.maximum(1, np.round(boxes[:, 2:] - boxes[:, :2])).astype(np.int64)  # (N, 2) w, h
    crops = np.empty((len(boxes), size, size, 3), dtype=np.uint8)
    for i, ((x0, y0), (w, h)) in enumerate(zip(origin, extent)):
        sx0, sy0 = max(x0, 0), max(y0, 0)
        sx1, sy1 = min(x0 + w, width), min(y0 + h, height)
        if sx0 == x0 and sy0 == y0 and sx1 == x0 + w and sy1 == y0 + h:
            patch = image[y0 : y0 + h, x0 : x0 + w]
        else:
            patch = np.zeros((h, w, 3), dtype=np.uint8)
            if sx1 > sx0 and sy1 > sy0:
                patch[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
        crops[i] = cv2.resize(patch, (size, size), interpolation=cv2.INTER_AREA)
    return crops, origin, extent


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 (N, 3, H, W), (x − 127.5)·0.0078125 as in training."""
    x = (images.astype(np.float32) - 127.5) * 0.0078125
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, 3, H, W)


def pnet_candidates(face_prob: np.ndarray, offsets: np.ndarray, scale_xy: tuple[float, float], threshold: float):
    """Boxes (K, 4) in image pixels, scores (K,) and offsets (K, 4) of the PNet cells scoring ≥ threshold.

    face_prob (h, w) and offsets (4, h, w) are one image's PNet map at one pyramid level.
    """
    rows, cols = np.nonzero(face_prob >= threshold)
    sx, sy = scale_xy
    x1, y1 = PNET_STRIDE * cols / sx, PNET_STRIDE * rows / sy
    boxes = np.stack([x1, y1, x1 + PNET_CELL / sx, y1 + PNET_CELL / sy], axis=1)  # (K, 4)
    return boxes, face_prob[rows, cols], offsets[:, rows, cols].T  # (K, 4), (K,), (K, 4)


def load_card(model_dir: Path, verify: bool = True) -> dict:
    """The model card, with every file's sha256 checked (a swapped or truncated file fails here, not later)."""
    model_dir = Path(model_dir)
    card = yaml.safe_load((model_dir / "card.yaml").read_text())
    for name, entry in card["files"].items():
        path = model_dir / entry["path"]
        if verify and sha256_file(path) != entry["sha256"]:
            raise ValueError(f"{path}: sha256 does not match {model_dir / 'card.yaml'} ({name})")
    return card


@DETECTORS.register("mtcnn")
class Detector:
    """The MTCNN cascade over three ONNX Runtime sessions.

    model_dir: folder with card.yaml and the ONNX files it lists.
    thresholds: face-probability cut-offs of PNet, RNet, ONet (default: the card's 0.6, 0.7, 0.7).
        Lower finds more hard faces (profiles, blur) and more false positives.
    min_face_size: smallest face side searched, in pixels (default 20). Smaller adds pyramid levels
        at larger scales, which cost the most time.
    scale_factor: ratio between pyramid levels (default 0.709 ≈ 1/√2). Closer to 1 is slower, finer.
    intra_op_threads: ONNX Runtime threads per session; 1 suits a server running many requests at once.
    max_batch: largest RNet/ONet batch, bounding memory on crowded images.
    """

    def __init__(
        self,
        model_dir: Path | str = DEFAULT_MODEL_DIR,
        thresholds: Sequence[float] | None = None,
        min_face_size: float | None = None,
        scale_factor: float | None = None,
        intra_op_threads: int = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
        max_batch: int = 256,
        verify: bool = True,
    ) -> None:
        model_dir = Path(model_dir)
        self.card = load_card(model_dir, verify)
        self.thresholds = tuple(float(t) for t in (self.card["thresholds"] if thresholds is None else thresholds))
        if len(self.thresholds) != 3 or not all(0 <= t <= 1 for t in self.thresholds):
            raise ValueError(f"thresholds must be three probabilities, got {self.thresholds}")
        self.min_face_size = float(self.card["min_face_size"] if min_face_size is None else min_face_size)
        self.scale_factor = float(self.card["scale_factor"] if scale_factor is None else scale_factor)
        pyramid_scales(1, 1, self.min_face_size, self.scale_factor)  # validates both
        self.nms_cfg = self.card["nms"]
        self.max_batch = max_batch
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        options.inter_op_num_threads = 1
        self.sessions = {
            name: ort.InferenceSession(str(model_dir / entry["path"]), options, providers=list(providers))
            for name, entry in self.card["files"].items()
        }

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """All faces in an (H, W, 3) uint8 RGB image (or (H, W) grey), largest first."""
        image = _as_rgb(image_rgb)
        boxes = self._propose(image)
        if len(boxes):
            boxes = self._refine(image, boxes)
        if not len(boxes):
            return []
        boxes, scores, landmarks = self._output(image, boxes)
        faces = [Detection(tuple(float(v) for v in b), float(s), lm) for b, s, lm in zip(boxes, scores, landmarks)]
        return sorted(faces, key=lambda f: f.area, reverse=True)

    def _run(self, name: str, crops: np.ndarray) -> list[np.ndarray]:
        """One network over uint8 crops (N, S, S, 3), in batches of at most max_batch."""
        parts = [self.sessions[name].run(None, {"image": normalise(crops[i : i + self.max_batch])})
                 for i in range(0, len(crops), self.max_batch)]
        return [np.concatenate(outs) for outs in zip(*parts)]

    def _propose(self, image: np.ndarray) -> np.ndarray:
        """Stage 1: squared PNet boxes (K, 4) after NMS and regression."""
        height, width = image.shape[:2]
        found = []  # (boxes, scores, offsets) per pyramid level
        for scale in pyramid_scales(height, width, self.min_face_size, self.scale_factor):
            hs, ws = math.ceil(height * scale), math.ceil(width * scale)
            scaled = cv2.resize(image, (ws, hs), interpolation=cv2.INTER_AREA)
            offsets, face_prob = self.sessions["pnet"].run(None, {"image": normalise(scaled[None])})
            boxes, scores, deltas = pnet_candidates(face_prob[0], offsets[0], (ws / width, hs / height), self.thresholds[0])
            keep = nms(boxes, scores, self.nms_cfg["pnet_per_scale"])
            found.append((boxes[keep], scores[keep], deltas[keep]))
        if not found:
            return np.zeros((0, 4))
        boxes, scores, deltas = (np.concatenate(parts) for parts in zip(*found))
        keep = nms(boxes, scores, self.nms_cfg["pnet"])
        return square(regress(boxes[keep], deltas[keep]))

    def _refine(self, image: np.ndarray, boxes: np.ndarray) -> np.ndarray:
        """Stage 2: RNet re-scores the proposals; squared, regressed survivors (K, 4)."""
        crops, _, _ = crop_windows(image, boxes, 24)
        offsets, face_prob = self._run("rnet", crops)
        passed = face_prob >= self.thresholds[1]
        boxes, scores, offsets = boxes[passed], face_prob[passed], offsets[passed]
        keep = nms(boxes, scores, self.nms_cfg["rnet"])
        return square(regress(boxes[keep], offsets[keep]))

    def _output(self, image: np.ndarray, boxes: np.ndarray):
        """Stage 3: ONet's boxes (K, 4), scores (K,) and landmarks (K, 5, 2) in image pixels."""
        crops, origin, extent = crop_windows(image, boxes, 48)
        offsets, face_prob, points = self._run("onet", crops)
        passed = face_prob >= self.thresholds[2]
        # landmarks are fractions of the crop the network saw
        landmarks = origin[passed, None, :] + points[passed] * extent[passed, None, :]  # (K, 5, 2)
        boxes = regress(boxes[passed], offsets[passed])
        scores = face_prob[passed]
        keep = nms(boxes, scores, self.nms_cfg["onet"], self.nms_cfg["onet_mode"])
        return boxes[keep], scores[keep], landmarks[keep].astype(np.float64)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8:
        raise ValueError("expected a uint8 numpy image")
    if image.ndim == 2:
        return np.ascontiguousarray(np.repeat(image[:, :, None], 3, axis=2))
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB or (H, W) grey image, got shape {image.shape}")
    return image
