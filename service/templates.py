"""The template service layer: frames -> CAFace contributions -> the Redis memory -> the fused template.

Each frame (an image, or an embedding with its style statistics computed elsewhere by the same
recognition model) becomes its own contribution row of float64 sums (`frame_deltas`); the rows
go to Redis in one atomic append that skips repeated frame ids; the template is the fusion
model's aggregation of the memory alone. Frames that cannot count (undecodable, no face, below
the quality floor, a repeated id) are reported with their index and reason, never dropped silently.
"""
from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass

import numpy as np
from starlette.concurrency import run_in_threadpool

from engines.fusion import FrameContribution, FusedTemplate, FusionModel
from service.decisions import quality_gate
from service.errors import InvalidInput, NotFound, ServiceError
from service.faces import EmbedOptions, FaceService
from service.inputs import Frame
from service.metrics import Metrics
from service.template_store import TemplateStore, check_id


@dataclass(frozen=True)
class Rejection:
    index: int
    reason: str


@dataclass(frozen=True)
class FramesOutcome:
    template_id: str
    frames: int
    accepted: int
    rejected: list[Rejection]
    quality: float | None


@dataclass(frozen=True)
class TemplateView:
    template_id: str
    frames: int
    quality: float
    embedding: np.ndarray


def frame_deltas(fusion: FusionModel, contribution: FrameContribution) -> np.ndarray:
    """(N, L) float64: each frame's own memory delta as a flat vector (`MemoryDelta.to_vector`'s layout)."""
    return np.stack([fusion.memory_delta(contribution.frame(i)).to_vector() for i in range(len(contribution.assignment))])


def checked_deltas(fusion: FusionModel, contribution: FrameContribution, frames: list[Frame]) -> np.ndarray:
    """`frame_deltas` of these frames (one contribution row each), refusing (422) the first frame whose
    client-sent (finite but extreme) embedding, magnitude or style overflows the fusion model in float32:
    stored, its NaN row would leave the memory unreadable."""
    deltas = frame_deltas(fusion, contribution)
    overflowed = [f.index for f, ok in zip(frames, np.isfinite(deltas).all(axis=1)) if not ok]
    if overflowed:
        raise InvalidInput(f"frames[{overflowed[0]}]: its embedding, magnitude or style overflows the "
                           "fusion model (float32)")
    return deltas


def model_id(fusion: FusionModel) -> str:
    """Names the fusion model a memory was built with (name, version and a digest of both graphs)."""
    c = fusion.card
    digest = hashlib.sha256((c.files.assign.sha256 + c.files.aggregate.sha256).encode()).hexdigest()[:12]
    return f"{c.name}:{c.version}:{digest}"


class TemplateService:
    def __init__(self, faces: FaceService, fusion: FusionModel, store: TemplateStore, metrics: Metrics,
                 min_face_size: float) -> None:
        self.faces, self.fusion, self.store, self.metrics = faces, fusion, store, metrics
        self.card = faces.card
        self.min_face_size = min_face_size
        rec = fusion.card.recognition
        if rec.onnx_sha256 != self.card.files.onnx.sha256:  # its inputs are that exact model's outputs
            raise ValueError(f"fusion model {fusion.card.name} {fusion.card.version} was trained on {rec.name} "
                             f"{rec.version}, not on the served {self.card.name} {self.card.version}")

    async def add_frames(self, template_id: str, frames: list[Frame], min_quality: float | None,
                         default_min_quality: float = 0.0) -> FramesOutcome:
        """Frames below `min_quality` (the caller's, else the service's default) are rejected as low_quality; a
        model without a validated quality applies no floor and refuses (422) one the caller sets."""
        check_id(template_id)
        if min_quality:
            quality_gate(self.card, "min_quality")
        floor = (default_min_quality if min_quality is None else min_quality) if self.card.quality else 0.0
        rejected: list[Rejection] = []
        raw, style, kept = await self._embed(frames, rejected)
        quality = self.faces.pipeline.quality(raw, style) if floor else np.ones(len(raw))
        good = [i for i in range(len(kept)) if quality[i] >= floor]
        rejected += [Rejection(kept[i].index, "low_quality") for i in range(len(kept)) if quality[i] < floor]
        kept = [kept[i] for i in good]
        if kept:
            deltas = checked_deltas(self.fusion, self.fusion.assign(raw[good], style[good]), kept)
            result = await self.store.append(template_id, deltas, [f.frame_id for f in kept])
            rejected += [Rejection(f.index, "duplicate_frame_id") for f, added in zip(kept, result.added) if not added]
            accepted, memory = sum(result.added), result.memory
        else:
            accepted, memory = 0, await self._read_or_none(template_id)
        for r in rejected:
            self.metrics.frames.labels(r.reason).inc()
        self.metrics.frames.labels("accepted").inc(accepted)
        fused = self.fusion.aggregate(*self.fusion.memory_from_vector(memory.sums)) if memory and memory.frames else None
        return FramesOutcome(template_id, memory.frames if memory else 0, accepted,
                             sorted(rejected, key=lambda r: r.index), fused.quality if fused else None)

    async def get(self, template_id: str) -> TemplateView:
        memory = await self.store.read(template_id)
        fused: FusedTemplate = self.fusion.aggregate(*self.fusion.memory_from_vector(memory.sums))
        return TemplateView(template_id, memory.frames, fused.quality, fused.embedding)

    async def delete(self, template_id: str) -> None:
        await self.store.delete(template_id)

    async def _read_or_none(self, template_id: str):
        try:
            return await self.store.read(template_id)
        except NotFound:
            return None

    async def _embed(self, frames: list[Frame], rejected: list[Rejection]):
        """(raw (n, D), style (n, S), the n frames they belong to), in frame order; failures go to `rejected`."""
        images = [f for f in frames if f.image is not None]
        found = await asyncio.gather(*(run_in_threadpool(self._largest_face, f) for f in images))
        crops = {f.index: crop for f, crop in zip(images, found) if not isinstance(crop, Rejection)}
        rejected += [r for r in found if isinstance(r, Rejection)]
        order = sorted(crops)
        raw_img, style_img = await self.faces.infer(np.stack([crops[i] for i in order])) if order else (None, None)
        by_index = {i: (raw_img[k], style_img[k]) for k, i in enumerate(order)}
        by_index.update({f.index: (f.raw, f.style) for f in frames if f.raw is not None})
        kept = [f for f in frames if f.index in by_index]
        d, s = self.card.embedding_size, self.fusion.card.style_size
        raw = np.array([by_index[f.index][0] for f in kept], np.float32).reshape(-1, d)
        style = np.array([by_index[f.index][1] for f in kept], np.float32).reshape(-1, s)
        return raw, style, kept

    def _largest_face(self, frame: Frame):
        options = EmbedOptions(max_faces=1, min_face_size=self.min_face_size)
        try:
            detections, crops = self.faces.detect_align(frame.image, f"frames[{frame.index}]", options)
        except ServiceError as exc:
            return Rejection(frame.index, exc.code)
        return crops[0] if detections else Rejection(frame.index, "no_face")
