"""1:N search: per-replica FAISS indexes that follow the galleries in Redis (`service.gallery_store`).

Every request that reads a gallery first brings this replica's index up to the Redis log (one
round trip when nothing changed), so a search sees every enrolment acknowledged before it, on
any replica. The index is exact inner product over unit embeddings (cosine), on the GPU where
faiss has one; enrolment replaces an identity's embedding. Indexes live in this process's
memory only (no FAISS snapshot is written anywhere), and `follow` brings them all up to Redis on
a schedule, so a deleted identity leaves every replica within a bound even where nobody searches.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import faiss
import numpy as np
from redis.exceptions import RedisError

from service.errors import InvalidInput, NoFace, NotFound
from service.faces import EmbedOptions, FaceService
from service.gallery_store import GalleryStore
from service.schemas import Embedding
from service.templates import TemplateService

log = logging.getLogger(__name__)


@dataclass
class GalleryIndex:
    """One gallery's index on this replica: an identity's FAISS id is its slot in Redis (`gallery_store`)."""

    dim: int
    entry: str = "0-0"  # the last log entry applied
    loaded: bool = False
    index: faiss.Index = None
    names: dict[int, str] = field(default_factory=dict)  # slot -> identity
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.index = new_index(self.dim)
        self.names, self.loaded = {}, False

    def put(self, slot: int, identity: str, vector: np.ndarray) -> None:
        self.remove(slot)
        self.names[slot] = identity
        self.index.add_with_ids(np.asarray(vector, np.float32).reshape(1, -1), np.array([slot], np.int64))

    def remove(self, slot: int) -> None:
        if self.names.pop(slot, None) is not None:
            self.index.remove_ids(np.array([slot], np.int64))

    def search(self, queries: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        """Best `top_k` (identity, cosine) per query row (Q, D), best first."""
        k = min(top_k, self.index.ntotal)
        if k == 0:
            return [[] for _ in queries]
        sims, found = self.index.search(np.ascontiguousarray(queries, np.float32), k)  # (Q, k) each
        return [[(self.names[int(i)], float(s)) for s, i in zip(row_s, row_i) if i >= 0] for row_s, row_i in zip(sims, found)]


def new_index(dim: int) -> faiss.Index:
    """Exact inner-product index with our own ids; moved to the GPU where faiss has one."""
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))
    if hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0:  # faiss-gpu
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


@dataclass(frozen=True)
class SearchResult:
    matches: list[tuple[str, float]]
    identified: str | None
    threshold: float


class GalleryService:
    def __init__(self, faces: FaceService, store: GalleryStore, templates: TemplateService | None) -> None:
        self.faces, self.store, self.templates = faces, store, templates
        self.card = faces.card
        self.indexes: dict[str, GalleryIndex] = {}

    # ---- following Redis -----------------------------------------------------------------
    async def synced(self, gallery: str) -> GalleryIndex:
        """This replica's index of `gallery`, brought up to the Redis log."""
        idx = self.indexes.setdefault(gallery, GalleryIndex(self.card.embedding_size))
        async with idx.lock:
            if not idx.loaded:
                await self._reload(gallery, idx)
            while True:
                changes, gap = await self.store.changes_after(gallery, idx.entry)
                if gap:
                    await self._reload(gallery, idx)
                    continue
                for change in changes:
                    if change.op == "put":
                        idx.put(change.slot, change.identity, change.vector)
                    else:
                        idx.remove(change.slot)
                    idx.entry = change.entry
                if len(changes) < 1000:
                    return idx

    async def _reload(self, gallery: str, idx: GalleryIndex) -> None:
        idx.reset()
        idx.entry, records = await self.store.snapshot(gallery)
        for slot, (identity, vector) in records.items():
            idx.put(slot, identity, vector)
        idx.loaded = True

    async def follow(self, interval: float) -> None:
        """Brings every index of this replica up to Redis each `interval` s, so an identity deleted
        elsewhere leaves this replica's memory within that bound even if nobody reads its gallery here."""
        while True:
            await asyncio.sleep(interval)
            for gallery in list(self.indexes):
                try:
                    await self.synced(gallery)
                except RedisError as exc:  # Redis away: the next round (or read) catches up
                    log.warning("gallery %s: could not follow Redis (%s)", gallery, type(exc).__name__)

    # ---- operations ------------------------------------------------------------------------
    async def enrol(self, gallery: str, identity: str, images: list[bytes] | None = None,
                    embedding: Embedding | None = None, template_id: str | None = None) -> int:
        """Store the identity's embedding (replacing any earlier one); returns the gallery's size."""
        if images:
            vector = await self._from_images(images)
        elif template_id is not None:
            if self.templates is None:
                raise InvalidInput("template_id needs the template service, which is off")
            vector = (await self.templates.get(template_id)).embedding
        else:
            vector = embedding.unit.astype(np.float32)
        await self.store.put(gallery, identity, vector)
        return (await self.synced(gallery)).index.ntotal

    async def search(self, gallery: str, queries: list[np.ndarray | None], top_k: int, far: float) -> list[SearchResult]:
        """One result per query (a unit embedding, or None for an image without a face)."""
        threshold = self.faces.threshold(far)[1]
        idx = await self.synced(gallery)
        rows = [q for q in queries if q is not None]
        found = iter(idx.search(np.stack(rows), top_k) if rows else [])
        results = []
        for q in queries:
            matches = next(found) if q is not None else []
            best = matches[0] if matches and matches[0][1] >= threshold else None
            results.append(SearchResult(matches, best[0] if best else None, threshold))
        return results

    async def delete(self, gallery: str, identity: str) -> None:
        if await self.store.delete(gallery, identity) is None:
            raise NotFound(f"no identity {identity} in gallery {gallery}")
        await self.synced(gallery)

    async def info(self, gallery: str) -> tuple[int, str]:
        idx = await self.synced(gallery)
        device = "gpu" if "Gpu" in type(idx.index).__name__ else "cpu"
        return idx.index.ntotal, f"faiss exact inner product ({device}), {self.card.embedding_size}-d, {self.card.name} {self.card.version}"

    async def query_embeddings(self, images: list[bytes]) -> list[np.ndarray | None]:
        """The largest face of each image as a unit embedding (None where no face was found)."""
        faces = await self.faces.embed_images(images, EmbedOptions(max_faces=1, min_face_size=0.0))
        return [fs[0].face.embedding if fs else None for fs in faces]

    # ---- helpers ---------------------------------------------------------------------------
    async def _from_images(self, images: list[bytes]) -> np.ndarray:
        """The identity's embedding from its photos: the largest face of each, fused (CAFace where it runs, else the mean)."""
        faces = await self.faces.embed_images(images, EmbedOptions(max_faces=1, min_face_size=0.0))
        missing = [i for i, fs in enumerate(faces) if not fs]
        if missing:
            raise NoFace(f"no face found in images {missing}")
        found = [fs[0] for fs in faces]
        if self.templates is not None and len(found) > 1 and all(f.style is not None for f in found):
            raw = np.stack([f.face.embedding * f.face.magnitude for f in found])
            return self.templates.fusion.fuse(raw, np.stack([f.style for f in found])).embedding
        mean = np.mean([f.face.embedding for f in found], axis=0)
        return mean / np.linalg.norm(mean)
