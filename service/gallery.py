"""1:N search: per-replica FAISS indexes that follow the galleries in Redis (`service.gallery_store`).

Every request that reads a gallery first brings this replica's index up to the Redis log (one
round trip when nothing changed), so a search sees every enrolment acknowledged before it, on
any replica; concurrent reads share one catch-up. The index (`service.gallery_index`) is exact inner
product over unit embeddings (cosine) up to FACESET_GALLERY_EXACT_MAX identities, an approximate index
with an exactly re-scored shortlist above it. An identity's vector is the CAFace fusion of every photo it was given (its memory
stays in Redis beside it, so photos can be added later); its negatives ("not this person") veto
it for probes at least as close to one of them as to it (`veto`). `follow` brings every index up to
Redis on a schedule, so a deleted identity leaves every replica within a bound even where nobody
searches, and rewrites the index's snapshot on disk (FACESET_STATE_DIR) in the same round after
deletions; a cold replica loads a snapshot that Redis confirms (model, log position, checksum) and
catches up from the log, or rebuilds from Redis.
"""
from __future__ import annotations

import asyncio
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np
from redis.exceptions import RedisError

from engines.model_card import OpenSet
from engines.open_set import GALLERY_MIN_IDS, GALLERY_SAMPLE_IDS, adapt_to_gallery
from service.decisions import Decision, check_enrolment, decide, search_rule
from service.errors import Conflict, InvalidInput, NoFace, NotFound, Unavailable
from service.faces import EmbedOptions, FaceService, StyledFace
from service.gallery_index import PLACEMENTS, GalleryIndex, SnapshotError, read_snapshot, write_snapshot
from service.gallery_store import GalleryStore, Photos
from service.inputs import Frame
from service.schemas import Embedding
from service.templates import TemplateService, checked_deltas, model_id

log = logging.getLogger(__name__)

ADD_ATTEMPTS = 8  # reads of an identity's memory before mode=add gives up to concurrent writers


@dataclass(frozen=True)
class IndexOptions:
    """How replicas index galleries (the FACESET_GALLERY_* settings); `snapshot_dir` None: no snapshots."""

    exact_max: int = 100_000
    probe: float = 0.25
    snapshot_dir: Path | None = None
    snapshot_min: int = 10_000
    snapshot_interval_s: float = 600.0
    device: str = "cpu"  # where searches run: service.gallery_index.PLACEMENTS
    calibration_min: int = GALLERY_MIN_IDS  # a gallery this large decides by its own FPIR calibration (0: never)

    @classmethod
    def from_settings(cls, settings) -> IndexOptions:
        on = settings.gallery_snapshot_interval_s > 0
        PLACEMENTS[settings.gallery_device]()  # a gpu gallery without faiss-gpu or a GPU stops the start here
        return cls(settings.gallery_exact_max, settings.gallery_probe,
                   settings.state_dir / "galleries" if on else None, settings.gallery_snapshot_min,
                   settings.gallery_snapshot_interval_s, settings.gallery_device, settings.gallery_calibration_min)


def veto(probe: np.ndarray, candidates: list[tuple[str, float]], negatives: dict[str, np.ndarray]) -> set[str]:
    """The candidates (identity, cosine to the probe) the probe must not be identified as: those it is at least
    as close to one of their negatives (n, D), people wrongly identified as them before, as to themselves."""
    return {i for i, sim in candidates if i in negatives and float(np.max(negatives[i] @ probe)) >= sim}


def fusion_used(photos: Photos) -> str:
    """How an identity's vector was made: "caface" (the template of its kept CAFace memory) or "mean" (the mean of
    its photos' unit embeddings, where the fusion model is off or the served model has no style output)."""
    return "caface" if photos.memory is not None else "mean"


@dataclass(frozen=True)
class SearchResult:
    matches: list[tuple[str, float]]
    identified: str | None
    threshold: float
    decision: Decision
    fpir: float | None
    gallery_size: int
    quality: float | None
    probe_floor: float | None  # None: quality gating is off for this model
    fpir_calibration: str | None = None  # whose FPIR model set the threshold: "gallery", "model"; None: by FAR


class GalleryService:
    def __init__(self, faces: FaceService, store: GalleryStore, templates: TemplateService | None,
                 options: IndexOptions = IndexOptions()) -> None:
        self.faces, self.store, self.templates, self.options = faces, store, templates, options
        self.card = faces.card
        self.indexes: dict[str, GalleryIndex] = {}
        # searches and index changes: one OpenMP thread each, so concurrent searches share the cores
        self.pool = ThreadPoolExecutor(os.cpu_count() or 1, "gallery-search", faiss.omp_set_num_threads, (1,))
        self.builder = ThreadPoolExecutor(1, "gallery-build")  # approximate indexes, one at a time
        self._saved: dict[str, float] = {}  # gallery -> when its snapshot was last written
        self._fitting: dict[str, asyncio.Lock] = {}  # gallery -> one FPIR calibration at a time on this replica

    def close(self) -> None:
        self.pool.shutdown(wait=False)
        self.builder.shutdown(wait=False, cancel_futures=True)

    # ---- following Redis -----------------------------------------------------------------
    async def synced(self, gallery: str) -> GalleryIndex:
        """This replica's index of `gallery`, brought up to the Redis log by a catch-up that began after this call
        did: concurrent callers share one (a read that waits on the lock is served by the next catch-up)."""
        idx = self.indexes.get(gallery)
        if idx is None:
            idx = self.indexes[gallery] = GalleryIndex(self.card.embedding_size, self.options.exact_max,
                                                       self.options.probe, self.options.device)
        arrived = idx.started
        async with idx.lock:
            if idx.done > arrived:
                return idx
            idx.started += 1
            if not idx.loaded:
                await self._load(gallery, idx)
            while True:
                changes, gap = await self.store.changes_after(gallery, idx.entry)
                if gap:
                    await self._reload(gallery, idx)
                    continue
                if changes:
                    await self._run(idx.apply, changes)
                if len(changes) < 1000:
                    break
            idx.done = idx.started
        if idx.wants_build():
            idx.building = True
            asyncio.get_running_loop().run_in_executor(self.builder, self._build, gallery, idx)
        return idx

    def _build(self, gallery: str, idx: GalleryIndex) -> None:
        try:
            t0 = time.perf_counter()
            idx.build()
            log.info("gallery %s: approximate index over %d identities swapped in after %.1f s",
                     gallery, len(idx), time.perf_counter() - t0)
        except Exception:  # the exact scan keeps serving; the next catch-up tries again
            log.exception("gallery %s: building the approximate index failed", gallery)
        finally:
            idx.building = False

    def _compact(self, gallery: str, idx: GalleryIndex) -> None:
        try:
            t0 = time.perf_counter()
            erased = idx.erased
            idx.compact()
            log.info("gallery %s: %d erased entries dropped from the approximate index in %.1f s", gallery, erased,
                     time.perf_counter() - t0)
        except Exception:  # the erased entries are never proposed; the next round tries again
            log.exception("gallery %s: compacting the approximate index failed", gallery)
        finally:
            idx.building = False

    async def _run(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    async def _reload(self, gallery: str, idx: GalleryIndex) -> None:
        entry, records = await self.store.snapshot(gallery)
        slots = np.fromiter(records, np.int64, len(records))
        vectors = np.stack([records[s][1] for s in slots.tolist()]) if records else np.zeros((0, idx.dim), np.float32)
        await self._run(idx.load, entry, slots, [records[s][0] for s in slots.tolist()], vectors)
        idx.changed = True

    # ---- snapshots -----------------------------------------------------------------------------
    def snapshot_path(self, gallery: str) -> Path | None:
        if self.options.snapshot_dir is None:
            return None
        prefix = self.store.prefix.encode().hex()  # any prefix, as a file name
        return self.options.snapshot_dir / f"{prefix}-{gallery}.snapshot"

    def snapshot_tag(self, gallery: str) -> dict:
        card = self.card
        return {"gallery": gallery, "model": {"name": card.name, "version": card.version, "dim": card.embedding_size}}

    async def _load(self, gallery: str, idx: GalleryIndex) -> None:
        """From the snapshot where Redis confirms it, else from Redis; a bad snapshot is logged and removed."""
        path = self.snapshot_path(gallery)
        if path is not None and path.exists():
            try:
                snap = await asyncio.to_thread(read_snapshot, path, idx.dim)
                problem = await self._stale(gallery, snap.header)
            except (SnapshotError, OSError) as exc:
                problem = f"corrupt ({exc})"
            if problem is None:
                await self._run(idx.load, snap.header["entry"], snap.slots, snap.names, snap.vectors, snap.approx,
                                snap.keys, snap.next_key)
                idx.approx_size = snap.header["approx_size"] if snap.approx is not None else 0
                return
            log.warning("gallery %s: snapshot %s is %s; rebuilding from Redis", gallery, path, problem)
            path.unlink(missing_ok=True)
        await self._reload(gallery, idx)

    async def _stale(self, gallery: str, header: dict) -> str | None:
        """Why a snapshot may not be loaded (another gallery or model, a log position Redis no longer holds)."""
        want = self.snapshot_tag(gallery)
        if {k: header.get(k) for k in want} != want:
            return f"stale (made for {header.get('gallery')}, {header.get('model')})"
        log_key = self.store.keys(gallery)[1]
        entry = header["entry"]
        if entry == "0-0" or not await self.store.client.xrange(log_key, min=entry, max=entry):
            return f"stale (log position {entry} trimmed away or never in this Redis)"
        return None

    async def save(self, gallery: str, idx: GalleryIndex) -> None:
        """Rewrites the gallery's snapshot after deletions (erasure) or a new approximate index, or after changes
        once per snapshot interval; removes it where the gallery shrank below the snapshot size."""
        path = self.snapshot_path(gallery)
        if path is None or not idx.loaded:
            return
        if len(idx) < self.options.snapshot_min:
            if path.exists():
                await asyncio.to_thread(path.unlink, True)
            return
        due = time.monotonic() - self._saved.get(gallery, -math.inf) >= self.options.snapshot_interval_s
        if idx.deleted or idx.rebuilt or (idx.changed and due) or not path.exists():
            await asyncio.to_thread(write_snapshot, path, idx, self.snapshot_tag(gallery))
            self._saved[gallery] = time.monotonic()

    async def follow(self, interval: float) -> None:
        """Brings every index of this replica up to Redis each `interval` s, so an identity deleted
        elsewhere leaves this replica's memory, and its snapshot, within that bound even if nobody reads its
        gallery here. Galleries with a snapshot on disk are loaded at once (and so followed too)."""
        for gallery in self._snapshotted():
            await self._follow(gallery)
        while True:
            await asyncio.sleep(interval)
            for gallery in list(self.indexes):
                await self._follow(gallery)

    def _snapshotted(self) -> list[str]:
        """The galleries of this key prefix with a snapshot in the snapshot folder."""
        folder, head = self.options.snapshot_dir, f"{self.store.prefix.encode().hex()}-"
        if folder is None or not folder.is_dir():
            return []
        return [p.name[len(head):-len(".snapshot")] for p in folder.glob(f"{head}*.snapshot")]

    async def _follow(self, gallery: str) -> None:
        try:
            idx = await self.synced(gallery)
            if idx.erased and not idx.building:  # deleted identities' codes leave the approximate index, then disk
                idx.building = True
                await asyncio.get_running_loop().run_in_executor(self.builder, self._compact, gallery, idx)
            await self.save(gallery, idx)
        except RedisError as exc:  # Redis away: the next round (or read) catches up
            log.warning("gallery %s: could not follow Redis (%s)", gallery, type(exc).__name__)
        except OSError as exc:  # a full disk: the next round tries again; deletions keep it due
            log.warning("gallery %s: could not write its snapshot (%s)", gallery, exc)
        except Exception:  # the follower must outlive any one gallery: it is what bounds erasure
            log.exception("gallery %s: could not follow it", gallery)

    # ---- operations ------------------------------------------------------------------------
    async def enrol(self, gallery: str, identity: str, images: list[bytes] | None = None,
                    embedding: Embedding | None = None, template_id: str | None = None,
                    frames: list[Frame] | None = None, add: bool = False, force: bool = False) -> tuple[int, Photos]:
        """Enrols the identity from these photos (replacing what it had), or with `add` from these and every
        photo it was given before (CAFace over the kept memory); returns the gallery's size and the identity's
        `Photos`. Photos whose best face is below the card's enrolment floor are refused unless `force`."""
        if add and self.templates is None:
            raise Unavailable("mode=add fuses every photo of the identity with the CAFace fusion model, which is off; "
                              "enrol with mode=replace and all the photos at once")
        vector, photos = await self._new_photos(images, embedding, template_id, frames, force)
        if add:
            photos = await self._add(gallery, identity, photos)
        else:
            if photos.memory is not None:
                vector, photos = self._fused(photos)
            await self.store.put(gallery, identity, vector, photos)
        return len(await self.synced(gallery)), photos

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
        n = len(idx)
        open_set, whose = await self.open_set(gallery, idx) if far is None else (None, None)
        rule = search_rule(self.card, n, far, fpir, *defaults, open_set=open_set)
        whose = whose if rule.fpir is not None and far is None else None
        rows = [q for q in queries if q is not None]
        found = iter(await self.without_vetoed(gallery, rows, await idx.search(self.pool, np.stack(rows), top_k)) if rows else [])
        results = []
        for q, quality in zip(queries, qualities or [None] * len(queries)):
            matches = next(found) if q is not None else []
            decision, identified = decide(rule, matches, quality)
            results.append(SearchResult(matches, identified, rule.threshold, decision, rule.fpir, n, quality,
                                        rule.probe_floor, whose))
        return results

    async def open_set(self, gallery: str, idx: GalleryIndex) -> tuple[OpenSet | None, str]:
        """(the FPIR model a search of this gallery decides by, "gallery" or "model"): the card's moved to the
        gallery's own identities once it holds `calibration_min` of them (engines.open_set.adapt_to_gallery), else
        the card's. The fit lives in Redis, so every replica decides alike; a replica refits it when the gallery
        has changed size by more than a tenth since, or the model is another."""
        prior = self.card.calibration.open_set if self.card.calibration else None
        n, least = len(idx), self.options.calibration_min
        if prior is None or not least or n < least:
            return prior, "model"
        stored = await self.store.calibration(gallery)
        if not self._current(stored, n):
            lock = self._fitting.setdefault(gallery, asyncio.Lock())
            async with lock:
                stored = await self.store.calibration(gallery)
                if not self._current(stored, n):
                    fitted = adapt_to_gallery(prior, await self._run(idx.sample, GALLERY_SAMPLE_IDS))
                    stored = dict(model=f"{self.card.name} {self.card.version}", identities=n, u=fitted.u,
                                  sigma=fitted.sigma, sampled=min(n, GALLERY_SAMPLE_IDS))
                    await self.store.set_calibration(gallery, stored)
        return prior.model_copy(update=dict(u=stored["u"], sigma=stored["sigma"])), "gallery"

    def _current(self, stored: dict | None, n: int) -> bool:
        return (stored is not None and stored.get("model") == f"{self.card.name} {self.card.version}"
                and abs(n - stored["identities"]) <= 0.1 * stored["identities"])

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
        return len(idx), f"{idx.describe()}, {self.card.embedding_size}-d, {self.card.name} {self.card.version}"

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
                          frames: list[Frame] | None, force: bool = False) -> tuple[np.ndarray | None, Photos]:
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
            memory = checked_deltas(fusion, fusion.assign(raw, style), frames).sum(axis=0)  # 422 before anything is stored
            return None, Photos(len(frames), float("nan"), model_id(fusion), memory)
        found = await self._faces(images)
        check_enrolment(self.card, [f.face.quality for f in found], force)
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
