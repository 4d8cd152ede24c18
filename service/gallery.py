"""1:N search: per-replica FAISS indexes that follow the galleries in Redis (`service.gallery_store`).

Every request that reads a gallery first brings this replica's index up to the Redis log (one
round trip when nothing changed), so a search sees every enrolment acknowledged before it, on
any replica. The index is exact inner product over unit embeddings (cosine), on the GPU where
faiss has one. An identity's vector is the CAFace fusion of every photo it was given (its memory
stays in Redis beside it, so photos can be added later); its negatives ("not this person") veto
it for probes at least as close to one of them as to it (`veto`). Indexes live in this process's
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

from service.decisions import Decision, decide, search_rule
from service.errors import Conflict, InvalidInput, NoFace, NotFound, Unavailable
from service.faces import EmbedOptions, FaceService, StyledFace
from service.gallery_store import GalleryStore, Photos
from service.inputs import Frame
from service.schemas import Embedding
from service.templates import TemplateService, model_id

log = logging.getLogger(__name__)

ADD_ATTEMPTS = 8  # reads of an identity's memory before mode=add gives up to concurrent writers


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


def veto(probe: np.ndarray, candidates: list[tuple[str, float]], negatives: dict[str, np.ndarray]) -> set[str]:
    """The candidates (identity, cosine to the probe) the probe must not be identified as: those it is at least
    as close to one of their negatives (n, D), people wrongly identified as them before, as to themselves."""
    return {i for i, sim in candidates if i in negatives and float(np.max(negatives[i] @ probe)) >= sim}


@dataclass(frozen=True)
class SearchResult:
    matches: list[tuple[str, float]]
    identified: str | None
    threshold: float
    decision: Decision
    fpir: float | None
    gallery_size: int
    quality: float | None


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
                    embedding: Embedding | None = None, template_id: str | None = None,
                    frames: list[Frame] | None = None, add: bool = False) -> tuple[int, Photos]:
        """Enrols the identity from these photos (replacing what it had), or with `add` from these and every
        photo it was given before (CAFace over the kept memory); returns the gallery's size and the identity's
        `Photos`."""
        if add and self.templates is None:
            raise Unavailable("mode=add fuses every photo of the identity with the CAFace fusion model, which is off; "
                              "enrol with mode=replace and all the photos at once")
        vector, photos = await self._new_photos(images, embedding, template_id, frames)
        if add:
            photos = await self._add(gallery, identity, photos)
        else:
            if photos.memory is not None:
                vector, photos = self._fused(photos)
            await self.store.put(gallery, identity, vector, photos)
        return (await self.synced(gallery)).index.ntotal, photos

    async def add_negatives(self, gallery: str, identity: str, images: list[bytes] | None = None,
                            embeddings: list[Embedding] | None = None) -> int:
        """Stores photos (their largest faces) or embeddings of people wrongly identified as `identity`;
        returns how many negatives it has."""
        if images:
            vectors = np.stack([f.face.embedding for f in await self._faces(images)])
        else:
            vectors = np.stack([e.unit for e in embeddings])
        return await self.store.add_negatives(gallery, identity, vectors)

    async def identity(self, gallery: str, identity: str) -> tuple[Photos, int]:
        """(what the identity was fused from, its number of negatives), as Redis holds them now."""
        record = await self.store.photos(gallery, identity)
        if record is None:
            raise NotFound(f"no identity {identity} in gallery {gallery}")
        return Photos.unpack(record), await self.store.negative_count(gallery, identity)

    async def search(self, gallery: str, queries: list[np.ndarray | None], top_k: int, far: float | None,
                     fpir: float | None, defaults: tuple[float, float],
                     qualities: list[float | None] | None = None) -> list[SearchResult]:
        """One result per query (a unit embedding, or None for an image without a face), decided at `far`, or
        `fpir` for the gallery's current size, or the (FAR, FPIR) defaults (`service.decisions.search_rule`)."""
        idx = await self.synced(gallery)
        n = idx.index.ntotal
        rule = search_rule(self.card, n, far, fpir, *defaults)
        rows = [q for q in queries if q is not None]
        found = iter(await self.without_vetoed(gallery, rows, idx.search(np.stack(rows), top_k)) if rows else [])
        results = []
        for q, quality in zip(queries, qualities or [None] * len(queries)):
            matches = next(found) if q is not None else []
            decision, identified = decide(rule, matches, quality)
            results.append(SearchResult(matches, identified, rule.threshold, decision, rule.fpir, n, quality))
        return results

    async def without_vetoed(self, gallery: str, probes: list[np.ndarray],
                             shortlists: list[list[tuple[str, float]]]) -> list[list[tuple[str, float]]]:
        """Each probe's shortlist less the candidates `veto` rules out, their negatives read from Redis now: one
        round trip for the whole batch, and every replica sees a negative once it is acknowledged."""
        negatives = await self.store.negatives(gallery, sorted({i for s in shortlists for i, _ in s}))
        out = []
        for probe, shortlist in zip(probes, shortlists):
            vetoed = veto(probe, shortlist, negatives)
            out.append([m for m in shortlist if m[0] not in vetoed])
        return out

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
        return [p[0] if p else None for p in await self.query_faces(images)]

    async def query_faces(self, images: list[bytes]) -> list[tuple[np.ndarray, float | None] | None]:
        """The largest face of each image as (unit embedding, quality); None where no face was found."""
        faces = await self.faces.embed_images(images, EmbedOptions(max_faces=1, min_face_size=0.0))
        return [(fs[0].face.embedding, fs[0].face.quality) if fs else None for fs in faces]

    # ---- helpers ---------------------------------------------------------------------------
    async def _faces(self, images: list[bytes]) -> list[StyledFace]:
        """The largest face of each image; NoFace naming the images without one."""
        faces = await self.faces.embed_images(images, EmbedOptions(max_faces=1, min_face_size=0.0))
        missing = [i for i, fs in enumerate(faces) if not fs]
        if missing:
            raise NoFace(f"no face found in images {missing}")
        return [fs[0] for fs in faces]

    async def _new_photos(self, images: list[bytes] | None, embedding: Embedding | None, template_id: str | None,
                          frames: list[Frame] | None) -> tuple[np.ndarray | None, Photos]:
        """What a request brings: its CAFace memory where the fusion model runs and the photos have style
        statistics (the vector is then the memory's, None here), else a vector (the mean of the photos)."""
        fusion = self.templates.fusion if self.templates is not None else None
        if template_id is not None:
            if fusion is None:
                raise InvalidInput("template_id needs the template service, which is off")
            memory = await self.templates.store.read(template_id)
            return None, Photos(memory.frames, float("nan"), model_id(fusion), memory.sums)
        if embedding is not None:
            return embedding.unit.astype(np.float32), Photos(1, float("nan"))
        if frames:  # precomputed embeddings with style (refused by validation where the fusion model is off)
            raw, style = np.stack([f.raw for f in frames]), np.stack([f.style for f in frames])
            return None, Photos(len(frames), float("nan"), model_id(fusion), self._memory(raw, style))
        found = await self._faces(images)
        if fusion is not None and all(f.style is not None for f in found):
            raw = np.stack([f.face.embedding * f.face.magnitude for f in found])  # (n, D)
            memory = self._memory(raw, np.stack([f.style for f in found]))
            return None, Photos(len(found), float("nan"), model_id(fusion), memory)
        mean = np.mean([f.face.embedding for f in found], axis=0)
        quality = [f.face.quality for f in found if f.face.quality is not None]
        return mean / np.linalg.norm(mean), Photos(len(found), float(np.mean(quality)) if quality else float("nan"))

    def _memory(self, raw: np.ndarray, style: np.ndarray) -> np.ndarray:
        """(L,) float64: the CAFace memory of raw embeddings (n, D) and their style statistics (n, S)."""
        fusion = self.templates.fusion
        return fusion.memory_delta(fusion.assign(raw, style)).to_vector()

    def _fused(self, photos: Photos) -> tuple[np.ndarray, Photos]:
        """The CAFace template of the memory (the identity's vector) and `photos` with its quality."""
        fusion = self.templates.fusion
        fused = fusion.aggregate(*fusion.memory_from_vector(photos.memory))
        return fused.embedding, Photos(photos.count, fused.quality, photos.model, photos.memory)

    async def _add(self, gallery: str, identity: str, new: Photos) -> Photos:
        """Adds `new`'s memory to the identity's (created where it has none) and writes the fused vector with
        the sum; a write between our read and ours (another replica's) makes us read and fuse again."""
        if new.memory is None:
            raise InvalidInput("mode=add needs photos, frames with style statistics or a template: "
                               "a bare embedding cannot be fused with the identity's photos")
        for _ in range(ADD_ATTEMPTS):
            record = await self.store.photos(gallery, identity)
            total = new
            if record is not None:
                old = Photos.unpack(record)
                if old.memory is None or old.model != new.model:
                    raise Conflict(f"identity {identity} keeps no memory of fusion model {new.model} (it was enrolled "
                                   "from an embedding, without the fusion model or with another one): enrol it "
                                   "again with mode=replace from all its photos")
                total = Photos(old.count + new.count, float("nan"), new.model, old.memory + new.memory)
            vector, total = self._fused(total)
            if await self.store.put(gallery, identity, vector, total, expected=record or b""):
                return total
        raise Conflict(f"identity {identity} kept changing while photos were added; try again")
