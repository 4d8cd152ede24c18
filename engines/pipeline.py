"""Photo -> faces: detect, align to the model card's reference landmarks, embed (one batched call), quality.

The same code serves `faceset eval` on raw photos and the HTTP service; it sees the recognition
model only through the `Engine` interface and its model card, so any runtime (or a dynamic
batcher in front of one) plugs in.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from engines.align import align, transform_points
from engines.base import EMBEDDING, STYLE, Engine, embed_aligned, run_aligned
from engines.detection import Detection, FaceDetector
from engines.model_card import ModelCard
from engines.quality_sources import card_source, face_quality
from engines.reference_landmarks import get_reference


@dataclass(frozen=True)
class Face:
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in photo pixels
    landmarks: np.ndarray  # (5, 2) photo pixels: left eye, right eye, nose, left/right mouth corner
    detection_score: float
    embedding: np.ndarray  # (D,) float32, L2-normalised
    magnitude: float  # ‖f‖ of the raw embedding: MagFace's quality signal
    quality: float | None  # the card's validated quality source mapped to [0, 1] (None: the card has no quality)


class FacePipeline:
    """detector, engine, card; detect_max_side: photos whose longer side exceeds it are detected on a
    copy shrunk to that size (detection time grows with pixels; faces in a large photo are large),
    then aligned from the full-resolution photo. None detects at full size."""

    def __init__(self, detector: FaceDetector, engine: Engine, card: ModelCard, detect_max_side: int | None = None) -> None:
        self.detector, self.engine, self.card = detector, engine, card
        self.reference, self.reference_size = get_reference(card.input.template)
        self.detect_max_side = detect_max_side
        self.quality_source = card_source(card)  # built once: a learned head holds an ONNX session

    def detect(self, image: np.ndarray, max_faces: int | None = None, min_face_size: float = 0.0) -> list[Detection]:
        """Faces of an RGB uint8 photo, largest first, at least `min_face_size` px on the shorter box side.

        Boxes and landmarks are in the photo's own pixels, also when detection ran on a shrunk copy.
        """
        found = [d for d in self._detect(image) if min(d.bbox[2] - d.bbox[0], d.bbox[3] - d.bbox[1]) >= min_face_size]
        found.sort(key=lambda d: d.area, reverse=True)
        return found[:max_faces] if max_faces else found

    def _detect(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        if not self.detect_max_side or max(h, w) <= self.detect_max_side:
            return self.detector.detect(image)
        scale = self.detect_max_side / max(h, w)
        small = cv2.resize(image, (max(1, round(w * scale)), max(1, round(h * scale))), interpolation=cv2.INTER_AREA)
        sx, sy = w / small.shape[1], h / small.shape[0]  # exact ratios after rounding the size
        # small-copy pixels -> photo pixels, pixel centres at i (OpenCV's convention): x ↦ (x + 0.5)·s − 0.5
        to_photo = np.array([[sx, 0.0, 0.5 * sx - 0.5], [0.0, sy, 0.5 * sy - 0.5]])
        out = []
        for d in self.detector.detect(small):
            corners = transform_points(to_photo, np.reshape(d.bbox, (2, 2)))  # (x1, y1), (x2, y2)
            out.append(Detection(tuple(float(v) for v in corners.ravel()), d.score,
                                 transform_points(to_photo, d.landmarks)))
        return out

    def align(self, image: np.ndarray, detections: Sequence[Detection]) -> np.ndarray:
        """(N, S, S, 3) uint8 crops, S the card's input size."""
        s = self.card.input.size
        crops = [align(image, d.landmarks, s, self.reference, self.reference_size) for d in detections]
        return np.stack(crops) if crops else np.zeros((0, s, s, 3), np.uint8)

    def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Raw embeddings (N, D) of aligned crops (the card's flip TTA included)."""
        if len(crops) == 0:
            return np.zeros((0, self.card.embedding_size), np.float32)
        return embed_aligned(self.engine, self.card, crops)

    def run(self, images: Sequence[np.ndarray], max_faces: int | None = None, min_face_size: float = 0.0) -> list[list[Face]]:
        """Every face of every photo; all crops go to the engine in one call."""
        detections = [self.detect(img, max_faces, min_face_size) for img in images]
        crops = [self.align(img, dets) for img, dets in zip(images, detections)]
        crops = np.concatenate(crops) if crops else np.zeros((0,))
        if len(crops) == 0:
            return self.faces(detections, self.embed_crops(crops))
        out = run_aligned(self.engine, self.card, crops)  # the style too: a learned quality reads it
        return self.faces(detections, out[EMBEDDING], out.get(STYLE))

    def quality(self, raw: np.ndarray, style: np.ndarray | None = None) -> np.ndarray | None:
        """Per-face quality (N,) in [0, 1] from raw embeddings (and style statistics, for a learned head); None
        where the card has no validated quality."""
        return face_quality(self.card, {EMBEDDING: raw, STYLE: style}, self.quality_source)

    def faces(self, detections: list[list[Detection]], raw: np.ndarray,
              style: np.ndarray | None = None) -> list[list[Face]]:
        """Faces from each photo's detections and the raw embeddings (and style statistics) of their crops, in order."""
        norms = np.linalg.norm(raw, axis=1)  # (N,)
        unit = raw / np.maximum(norms, 1e-12)[:, None]
        quality = self.quality(raw, style)
        quality = [None] * len(raw) if quality is None else quality
        out, i = [], 0
        for dets in detections:
            faces = []
            for d in dets:
                faces.append(Face(tuple(float(v) for v in d.bbox), np.asarray(d.landmarks, np.float32), float(d.score),
                                  unit[i].astype(np.float32), float(norms[i]), None if quality[i] is None else float(quality[i])))
                i += 1
            out.append(faces)
        return out
