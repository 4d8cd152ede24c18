"""The face service layer: image bytes -> faces (/embed) and two sides -> a decision (/verify).

Decoding, detection and alignment of each image run in worker threads side by side; the crops
of a request then go to the dynamic batcher together, so concurrent requests share recognition
inferences. Nothing here knows about HTTP: routes call these methods, tests may too.
"""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from engines.base import EMBEDDING, STYLE, merge_tta, preprocess, with_tta
from engines.batcher import DynamicBatcher
from engines.detection import Detection
from engines.model_card import ModelCardError, resolve_far, threshold_at
from engines.pipeline import Face, FacePipeline
from service.decisions import far_threshold, quality_gate
from service.errors import InvalidInput, NoFace
from service.images import decode
from service.metrics import Metrics
from service.schemas import VerifySide


@dataclass(frozen=True)
class EmbedOptions:
    max_faces: int
    min_face_size: float
    min_quality: float = 0.0


@dataclass(frozen=True)
class StyledFace:
    face: Face
    style: np.ndarray | None  # CAFace style statistics (S,), where the model has them


@dataclass(frozen=True)
class SideResult:
    embedding: np.ndarray  # (D,) unit
    face: Face | None  # the compared face when the side was an image
    faces_found: int | None


@dataclass(frozen=True)
class Verdict:
    similarity: float
    match: bool
    threshold: float
    far: float
    band: tuple[float, float] | None  # the pair-quality band whose threshold decided (None: the overall one)
    a: SideResult
    b: SideResult


class FaceService:
    def __init__(self, pipeline: FacePipeline, batcher: DynamicBatcher, metrics: Metrics, max_pixels: int) -> None:
        self.pipeline, self.batcher, self.metrics, self.max_pixels = pipeline, batcher, metrics, max_pixels
        self.card = pipeline.card
        self._probe_reference: np.ndarray | None = None

    # ---- /embed ------------------------------------------------------------------------
    async def embed_images(self, images: list[bytes], options: EmbedOptions) -> list[list[StyledFace]]:
        """Faces of every image, largest first, each list cut to options.max_faces (and, where the model has a
        validated quality, above options.min_quality; a floor it cannot apply is a 422)."""
        if options.min_quality > 0:
            quality_gate(self.card, "min_quality")
        labels = ["image"] if len(images) == 1 else [f"images[{i}]" for i in range(len(images))]
        found = await asyncio.gather(*(run_in_threadpool(self.detect_align, data, label, options)
                                       for data, label in zip(images, labels)))
        detections = [dets for dets, _ in found]
        raw, style = await self.infer(np.concatenate([crops for _, crops in found]))
        faces, i = [], 0
        for fs in self.pipeline.faces(detections, raw, style):
            faces.append([StyledFace(f, None if style is None else style[i + k]) for k, f in enumerate(fs)])
            i += len(fs)
        if options.min_quality > 0:
            faces = [[f for f in fs if f.face.quality >= options.min_quality] for fs in faces]
        self.metrics.observe_faces(f.face.quality for fs in faces for f in fs)
        return faces

    def detect_align(self, data: bytes, label: str, options: EmbedOptions) -> tuple[list[Detection], np.ndarray]:
        try:
            image = decode(data, self.max_pixels, label)
        except Exception:
            self.metrics.images.labels("rejected").inc()
            raise
        started = time.perf_counter()
        detections = self.pipeline.detect(image, options.max_faces, options.min_face_size)
        self.metrics.detection.observe(time.perf_counter() - started)
        self.metrics.images.labels("with_face" if detections else "no_face").inc()
        return detections, self.pipeline.align(image, detections)

    async def embed_crops(self, crops: np.ndarray) -> np.ndarray:
        """Raw embeddings (N, D) of aligned crops (N, S, S, 3) through the batcher (the card's flip TTA included)."""
        return (await self.infer(crops))[0]

    async def infer(self, crops: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Raw embeddings (N, D) and, where the batcher's engine gives them, CAFace style statistics (N, S)."""
        if len(crops) == 0:
            return np.zeros((0, self.card.embedding_size), np.float32), None
        out = merge_tta(await self.batcher.run(with_tta(preprocess(crops, self.card), self.card)), self.card)
        return out[EMBEDDING], out.get(STYLE)

    # ---- /verify -----------------------------------------------------------------------
    def threshold(self, far: float) -> tuple[float, float]:
        """(the calibrated FAR used, its cosine threshold) for a requested FAR; a 422 where the card has none."""
        try:
            used = resolve_far(self.card, far)
            return used, threshold_at(self.card, used)
        except ModelCardError as exc:
            raise InvalidInput(str(exc)) from None

    async def verify(self, a: VerifySide, b: VerifySide, far: float) -> Verdict:
        self.threshold(far)  # a FAR the card cannot serve is refused before any image is read
        side_a, side_b = await asyncio.gather(self._side("a", a), self._side("b", b))
        qualities = [s.face.quality if s.face is not None else None for s in (side_a, side_b)]
        lower = None if None in qualities else min(qualities)  # an embedding side has no quality: overall threshold
        used, threshold, band = far_threshold(self.card, far, lower)
        similarity = float(np.dot(side_a.embedding, side_b.embedding))
        return Verdict(similarity, similarity >= threshold, threshold, used, band and (band.low, band.high),
                       side_a, side_b)

    async def _side(self, label: str, side: VerifySide) -> SideResult:
        if side.embedding is not None:
            return SideResult(side.embedding.unit, None, None)
        options = EmbedOptions(max_faces=0, min_face_size=0.0)
        detections, crops = await run_in_threadpool(self.detect_align, side.data, f"image {label}", options)
        if not detections:
            raise NoFace(f"image {label}: no face found")
        raw, style = await self.infer(crops[:1])  # the largest face
        face = self.pipeline.faces([detections[:1]], raw, style)[0][0]
        self.metrics.observe_faces([face.quality])
        return SideResult(face.embedding.astype(np.float64), face, len(detections))

    # ---- readiness ---------------------------------------------------------------------
    async def self_test(self) -> str:
        """A real detection and recognition inference on a built-in image; raises if either fails.

        The first call records the probe's embedding; later ones must reproduce it (cosine ≥ 0.999),
        so a runtime that starts returning garbage is caught, not only one that raises.
        """
        image = probe_image()
        await run_in_threadpool(self.pipeline.detector.detect, image)
        s = self.card.input.size
        raw = await self.embed_crops(image[None, :s, :s])
        if raw.shape != (1, self.card.embedding_size) or not np.isfinite(raw).all():
            raise RuntimeError(f"recognition returned {raw.shape} with non-finite values")
        unit = raw[0] / max(float(np.linalg.norm(raw[0])), 1e-12)
        if self._probe_reference is None:
            self._probe_reference = unit
        cosine = float(np.dot(unit, self._probe_reference))
        if cosine < 0.999:
            raise RuntimeError(f"recognition of the probe image drifted (cosine {cosine:.4f} to start-up)")
        return f"detector and {self.batcher.engine.name} answered (probe cosine {cosine:.6f})"


def probe_image(size: int = 256) -> np.ndarray:
    """A fixed synthetic RGB image (smooth gradients and a disc): no face data ships with the service."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    disc = ((x - 0.5) ** 2 + (y - 0.45) ** 2 < 0.09).astype(np.float32)
    rgb = np.stack([0.6 * x + 0.3 * disc, 0.5 * y + 0.35 * disc, 0.4 * (1 - x) + 0.25 * disc], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).astype(np.uint8)
