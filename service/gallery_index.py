"""One gallery's index on a replica, and its snapshot on disk.

The vectors live in one numpy array, a row per identity keyed by the identity's slot in Redis
(`gallery_store`); up to `exact_max` identities a search scans them all (exact inner product). Above
it an IVF index, its coarse quantizer and codebooks trained on the gallery's own vectors, is built in a
background thread while the exact scan keeps serving; the changes applied after the copy it was built
from (the log position `entry` at that moment) are replayed into it before it is swapped in. It only
proposes a shortlist, which is re-scored exactly against the kept vectors: the scores returned are exact,
and only a neighbour the shortlist missed can be lost (recall and speed: `benchmarks/RESULTS.md`,
"Galleries of a million"). On the CPU its codes are 4-bit PQ fast-scan (D/2 sub-quantizers: a sixteenth of
the floats, scanned with SIMD lookup tables, several times faster than 8-bit scalar codes at the same
recall); GPU indexes have no fast-scan, so there it is 8-bit scalar-quantised.

Nothing is ever removed from the approximate index: in faiss 1.15.1 a vector added to a fast-scan list
after a removal from it gets a wrong code (0.5 of re-added vectors lost their place in our check). An entry
is keyed instead by a `key` of its own, and a removal or re-enrolment only retires the slot's key (a
tombstone; the shortlist skips retired keys); a re-enrolment adds the new vector under a new key. When
retired entries pass a fifth of the index it is rebuilt in the background like a grown one.

Searches run in worker threads (one OpenMP thread each, so concurrent searches do not oversubscribe
the cores) under the read side of a readers-writer lock; changes take its write side.

Where searches run is a `Placement` (FACESET_GALLERY_DEVICE): "cpu", or "gpu" with faiss-gpu. The
approximate index that changes are applied to always lives on the CPU (GPU indexes have no
remove_ids); the placement searches a copy of it uploaded after each batch of changes, each build
and each reload, so a removal or a re-enrolment takes the same path on either device (on the CPU the
"copy" is the index itself). All GPU galleries of a process share one StandardGpuResources, made on
first use: each one reserves scratch memory on the device.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import math
import struct
import threading
from collections.abc import Iterator
from concurrent.futures import Executor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import faiss
import numpy as np

from engines.atomic import atomic_write

SHORTLIST = 2000  # candidates the approximate index proposes (at least 20 × top_k), re-scored exactly
RETIRED_MAX = 0.2  # retired entries (tombstones), as a share of the index, that call for a rebuild
TRAIN_SAMPLE = 65_536  # vectors the quantizer and codebooks are trained on
MAGIC = b"FACESET-GALLERY-SNAPSHOT-1\n"


class RWLock:
    """Many readers or one writer; a waiting writer holds off new readers, so catch-ups are not starved."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = self._waiting = 0
        self._writer = False

    @contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._writer and not self._readers)
            self._waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class GalleryDeviceError(RuntimeError):
    """The gallery's device cannot be used here (no faiss-gpu, or no GPU)."""


class Shared:
    """One object per process, made by `factory` on first use (thread-safe), never before."""

    def __init__(self, factory) -> None:
        self._factory, self._value, self._lock = factory, None, threading.Lock()

    def get(self):
        with self._lock:
            if self._value is None:
                self._value = self._factory()
            return self._value


def _new_gpu_resources():
    if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
        raise GalleryDeviceError("FACESET_GALLERY_DEVICE=gpu needs faiss-gpu and a GPU (README, GPU)")
    return faiss.StandardGpuResources()


GPU_RESOURCES = Shared(_new_gpu_resources)  # every GPU gallery of the process: their scratch memory is reserved once


class CpuPlacement:
    """Searches on the CPU: the approximate index is searched where changes are applied to it."""

    label = "cpu"

    @staticmethod
    def codes(dim: int) -> str:
        """The approximate index's codes: 4-bit PQ fast-scan where the dimension splits in pairs."""
        return f"PQ{dim // 2}x4fs" if dim % 2 == 0 else "SQ8"

    def knn(self, queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn(queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT)  # (Q, k) each

    def upload(self, index: faiss.Index) -> faiss.Index:
        return index


class GpuPlacement:
    """Searches on a GPU: exact scans by faiss.knn_gpu, the approximate index as an uploaded copy."""

    def __init__(self, device: int = 0) -> None:
        self.device, self.label = device, f"gpu {device}"
        GPU_RESOURCES.get()  # fail at start, not at the first search

    @staticmethod
    def codes(dim: int) -> str:
        return "SQ8"  # faiss-gpu has no fast-scan index

    def knn(self, queries: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return faiss.knn_gpu(GPU_RESOURCES.get(), queries, vectors, k, metric=faiss.METRIC_INNER_PRODUCT,
                             device=self.device)

    def upload(self, index: faiss.Index) -> faiss.Index:
        return faiss.index_cpu_to_gpu(GPU_RESOURCES.get(), self.device, index)


PLACEMENTS = {"cpu": CpuPlacement, "gpu": GpuPlacement}


class GalleryIndex:
    """The vectors of one gallery (row per slot), exact search, and the approximate index above `exact_max`."""

    def __init__(self, dim: int, exact_max: int, probe: float, device: str = "cpu") -> None:
        self.dim, self.exact_max, self.probe = dim, exact_max, probe
        self.placement = PLACEMENTS[device]()
        self.entry, self.loaded = "0-0", False  # the last log entry applied
        self.lock = asyncio.Lock()  # one catch-up with Redis at a time (GalleryService.synced)
        self.started = self.done = 0  # catch-ups started and finished, to let concurrent searches share one
        self.rw = RWLock()
        self.generation = 0  # bumped by a reload: a build from before it is thrown away
        self.building = False
        self.deleted = self.changed = self.rebuilt = False  # since the last snapshot
        self.load("0-0", np.zeros(0, np.int64), [], np.zeros((0, dim), np.float32))
        self.loaded = False

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, entry: str, slots: np.ndarray, names: list[str], vectors: np.ndarray,
             approx: faiss.Index | None = None, keys: np.ndarray | None = None, next_key: int = 0) -> None:
        """Replaces everything with these rows (a reload from Redis or a snapshot) at log position `entry`; a
        snapshot's approximate index comes with each row's key in it (None: keyed by slot) and its next key."""
        with self.rw.write():
            self.vectors = np.ascontiguousarray(vectors, np.float32)  # (N, D), rows past len(self) are spare
            self.slots = np.asarray(slots, np.int64)  # (N,) row -> slot
            self.rows = {int(s): r for r, s in enumerate(self.slots)}
            self.names = {int(s): name for s, name in zip(self.slots, names)}
            self.approx, self.approx_size, self.pending = approx, len(self.rows) if approx else 0, None
            self._keyed(self.slots[:len(self.rows)] if keys is None else keys, next_key)
            if approx is not None:  # a snapshot's index probes as this replica is set to
                ivf = faiss.extract_index_ivf(approx)
                ivf.nprobe = max(1, math.ceil(self.probe * ivf.nlist))
            self._upload()
            self.entry, self.loaded = entry, True
            self.generation += 1

    def _keyed(self, keys: np.ndarray, next_key: int = 0, key_of: dict | None = None) -> None:
        """The approximate index's entries: row i (slot self.slots[i]) is its entry keys[i]; others are retired.
        `key_rows` (key -> row, -1 retired) lets a shortlist of keys become rows in one numpy step."""
        keys = np.asarray(keys, np.int64)
        self.key_of = key_of if key_of is not None else {int(s): int(k) for s, k in zip(self.slots[:len(keys)], keys)}
        self.next_key = max(next_key, int(keys.max()) + 1 if keys.size else 0)
        self.key_rows = np.full(max(self.next_key, 1024), -1, np.int64)
        self.key_rows[keys] = np.arange(len(keys))
        self.retired = max(0, (self.approx.ntotal if self.approx is not None else 0) - len(keys))
        self.erased = self.retired  # a snapshot's retired entries: treated as erased ones (compact() drops them)

    def _retire(self, slot: int, erased: bool) -> None:
        """Retires the slot's entry; `erased`: the identity was deleted, so its codes must leave the index within
        the erasure bound (compact())."""
        key = self.key_of.pop(slot, None)
        if key is not None:
            self.key_rows[key] = -1
            self.retired += 1
            self.erased += erased

    def _add(self, slot: int) -> None:
        """Adds the slot's vector to the approximate index under a new key."""
        key, row = self.next_key, self.rows[slot]
        self.next_key += 1
        if key >= len(self.key_rows):  # full: double the room
            self.key_rows = np.concatenate([self.key_rows, np.full(len(self.key_rows), -1, np.int64)])
        self.approx.add_with_ids(self.vectors[row:row + 1], np.array([key], np.int64))
        self.key_rows[key], self.key_of[slot] = row, key

    def apply(self, changes: list) -> None:
        """Applies `gallery_store.Change`s in log order."""
        with self.rw.write():
            for change in changes:
                if change.op == "put":
                    self._put(change.slot, change.identity, change.vector)
                else:
                    self._remove(change.slot)
                self.entry = change.entry
            self.changed = self.changed or bool(changes)
            if changes:
                self._upload()

    def _upload(self) -> None:
        """The copy searches use, taken after the approximate index changed (under the write lock)."""
        self.searched = self.placement.upload(self.approx) if self.approx is not None else None

    def _put(self, slot: int, identity: str, vector: np.ndarray) -> None:
        row = self.rows.get(slot)
        if row is None:
            row = len(self.rows)
            if row == len(self.vectors):  # full: double the room
                self.vectors = np.concatenate([self.vectors, np.zeros((max(row, 1024), self.dim), np.float32)])
                self.slots = np.concatenate([self.slots, np.zeros(max(row, 1024), np.int64)])
            self.rows[slot], self.slots[row] = row, slot
        self.vectors[row], self.names[slot] = vector, identity
        if self.approx is not None:
            self._retire(slot, False)  # a re-enrolment: the old entry stays in the index, retired
            self._add(slot)
        if self.pending is not None:
            self.pending.add(slot)

    def _remove(self, slot: int) -> None:
        row = self.rows.pop(slot, None)
        if row is None:
            return
        del self.names[slot]
        last = len(self.rows)
        if row != last:  # the last row fills the hole
            moved = int(self.slots[last])
            self.vectors[row], self.slots[row], self.rows[moved] = self.vectors[last], moved, row
            if moved in self.key_of:
                self.key_rows[self.key_of[moved]] = row
            if self.pending is not None:  # a build's copy holds it at its old row
                self.pending.add(moved)
        self.vectors[last] = 0  # no copy of an erased vector stays in the spare rows
        if self.approx is not None:
            self._retire(slot, True)  # its entry stays in the index until compact(), never proposed again
        if self.pending is not None:
            self.pending.add(slot)
        self.deleted = True

    def sample(self, n: int, seed: int = 0) -> np.ndarray:
        """A copy of up to n of the gallery's vectors, drawn at random (the gallery's FPIR calibration)."""
        with self.rw.read():
            rows = len(self.rows)
            pick = np.random.default_rng(seed).choice(rows, n, replace=False) if rows > n else np.arange(rows)
            return self.vectors[np.sort(pick)].copy()

    async def search(self, pool: Executor, queries: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        """Best `top_k` (identity, cosine) per query row (Q, D), best first, computed in `pool`."""
        return await asyncio.get_running_loop().run_in_executor(pool, self.search_now, queries, top_k)

    def search_now(self, queries: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
        queries = np.ascontiguousarray(queries, np.float32)
        with self.rw.read():
            n = len(self.rows)
            k = min(top_k, n)
            if k == 0:
                return [[] for _ in queries]
            if self.approx is not None and n > self.exact_max:
                sims, rows = self._reranked(queries, k)
            else:
                sims, rows = self.placement.knn(queries, self.vectors[:n], k)  # (Q, k)
            return [[(self.names[int(self.slots[r])], float(s)) for s, r in zip(row_s, row_r) if r >= 0]
                    for row_s, row_r in zip(sims, rows)]

    def _reranked(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The approximate index's shortlist per query, re-scored exactly: (sims, rows), each (Q, k)."""
        _, found = self.searched.search(queries, max(SHORTLIST, 20 * k))  # (Q, S) keys, -1 past the end
        sims, rows = np.full((len(queries), k), -np.inf, np.float32), np.full((len(queries), k), -1, np.int64)
        for q, (query, keys) in enumerate(zip(queries, found)):
            cand = self.key_rows[keys[keys >= 0]]
            cand = cand[cand >= 0]  # retired entries (module docstring) are never proposed
            exact = self.vectors[cand] @ query  # (S,)
            best = np.argsort(-exact)[:k]
            sims[q, :len(best)], rows[q, :len(best)] = exact[best], cand[best]
        return sims, rows

    # ---- the approximate index ---------------------------------------------------------------
    def wants_build(self) -> bool:
        """Above exact_max with no approximate index, one trained at less than half today's size, or one whose
        retired entries pass RETIRED_MAX of it."""
        if not self.loaded or self.building or len(self) <= self.exact_max:
            return False
        return len(self) > 2 * self.approx_size or self.retired > RETIRED_MAX * max(self.approx_size, 1)

    def build(self, retrain: bool = True) -> None:
        """Trains an approximate index on a copy of the vectors (or, `retrain` False, refills a copy of the current
        one's trained quantizer and codebooks: compact()), replays what changed meanwhile and swaps it in. Runs in a
        background thread; searches keep using the exact scan (or the previous index) until the swap."""
        with self.rw.read():  # no writer runs: the copy and the start of `pending` are one log position
            n, generation = len(self), self.generation
            vectors, slots = self.vectors[:n].copy(), self.slots[:n].copy()
            trained = None if retrain or self.approx is None else faiss.clone_index(self.approx)
            trained_size = self.approx_size
            self.pending = set()
        try:
            keys = np.arange(n, dtype=np.int64)  # the new index's entries are keyed by the copy's rows
            if trained is None:
                index = new_approx(vectors, keys, self.probe, self.placement.codes(self.dim))
            else:
                trained.reset()
                trained.add_with_ids(vectors, keys)
                index = trained
            key_of = {int(s): k for k, s in enumerate(slots.tolist())}
        except BaseException:
            with self.rw.write():
                self.pending = None
            raise
        with self.rw.write():
            pending, self.pending = self.pending, None
            if generation != self.generation:  # reloaded meanwhile: this copy is of an older gallery
                return
            self.approx, self.rebuilt = index, True
            self.approx_size = n if trained is None else trained_size  # the growth rule counts from the training
            self._keyed(keys, n, key_of)
            for slot in pending or ():  # changed or moved since the copy: retire the copy's entry, add what is now
                self._retire(slot, slot not in self.rows)
                if slot in self.rows:
                    self._add(slot)
            self._upload()

    def compact(self) -> None:
        """Drops retired entries from the approximate index without training it again (a refill of its trained
        copy): the codes of deleted identities leave this replica's memory, and the next snapshot."""
        self.build(retrain=False)

    def describe(self) -> str:
        where = self.placement.label
        if self.approx is not None and len(self) > self.exact_max:
            ivf = faiss.extract_index_ivf(self.approx)
            fast = isinstance(self.approx, faiss.IndexIVFPQFastScan)  # (extract_index_ivf gives the IndexIVF base)
            codes = f"PQ{self.approx.pq.M}x4fs" if fast else "SQ8"
            return f"faiss IVF{ivf.nlist},{codes} ({where}; {ivf.nprobe} lists probed), shortlist re-scored exactly"
        return f"faiss exact inner product ({where})"


def new_approx(vectors: np.ndarray, slots: np.ndarray, probe: float, codes: str = "SQ8") -> faiss.Index:
    """IVF (√N lists) over `codes` (a placement's: PQ fast-scan or SQ8), trained on a sample of `vectors` (N, D),
    each row keyed by its slot."""
    n, dim = vectors.shape
    nlist = max(1, min(round(math.sqrt(n)), n // 39))  # k-means wants 39+ points per list
    index = faiss.index_factory(dim, f"IVF{nlist},{codes}", faiss.METRIC_INNER_PRODUCT)
    sample = np.random.default_rng(0).choice(n, min(n, TRAIN_SAMPLE), replace=False)
    index.train(vectors[np.sort(sample)])
    index.add_with_ids(vectors, slots)
    faiss.extract_index_ivf(index).nprobe = max(1, math.ceil(probe * nlist))
    return index


# ---- snapshots ---------------------------------------------------------------------------------
class SnapshotError(ValueError):
    """A snapshot file that is not one, or whose checksum does not hold."""


@dataclass(frozen=True)
class Snapshot:
    header: dict  # gallery, model {name, version, dim}, entry, count, sha256, ...
    slots: np.ndarray  # (N,) int64
    names: list[str]
    vectors: np.ndarray  # (N, D) float32
    approx: faiss.Index | None
    keys: np.ndarray | None = None  # (N,) each row's entry in `approx` (None: keyed by slot, older snapshots)
    next_key: int = 0


def write_snapshot(path: Path, idx: GalleryIndex, tag: dict) -> None:
    """Writes `idx` (rows, names, approximate index) at its log position, tagged with `tag` and a checksum."""
    with idx.rw.read():  # a consistent copy; the file is written after the lock is let go
        n, entry, approx_size = len(idx), idx.entry, idx.approx_size
        slots, vectors = idx.slots[:n].copy(), idx.vectors[:n].copy()
        names = "\n".join(idx.names[int(s)] for s in slots).encode()  # ids never hold a newline (check_id)
        approx = faiss.serialize_index(idx.approx).tobytes() if idx.approx is not None else b""
        keys = (np.array([idx.key_of[int(s)] for s in slots], "<i8").tobytes() if idx.approx is not None else b"")
        next_key = idx.next_key
        deleted, idx.deleted, idx.changed, idx.rebuilt = idx.deleted, False, False, False
    parts = [slots.astype("<i8").tobytes(), vectors.astype("<f4").tobytes(), names, keys, approx]
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    header = json.dumps({**tag, "entry": entry, "count": n, "names_bytes": len(names), "keys_bytes": len(keys),
                         "next_key": next_key, "approx_bytes": len(approx), "approx_size": approx_size,
                         "sha256": digest.hexdigest()}).encode()
    try:
        atomic_write(path, lambda f: [f.write(b) for b in (MAGIC, struct.pack("<I", len(header)), header, *parts)])
    except BaseException:
        idx.deleted = idx.deleted or deleted  # the old file may still hold someone erased: try again next round
        raise


def read_snapshot(path: Path, dim: int) -> Snapshot:
    data = path.read_bytes()
    try:
        if not data.startswith(MAGIC):
            raise SnapshotError("not a gallery snapshot")
        start = len(MAGIC) + 4
        (size,) = struct.unpack_from("<I", data, len(MAGIC))
        header = json.loads(data[start:start + size])
        payload = memoryview(data)[start + size:]
        if hashlib.sha256(payload).hexdigest() != header["sha256"]:
            raise SnapshotError("checksum mismatch")
        n = header["count"]
        slots = np.frombuffer(payload, "<i8", n).astype(np.int64)
        vectors = np.frombuffer(payload, "<f4", n * dim, offset=8 * n).reshape(n, dim).copy()
        at = 8 * n + 4 * n * dim
        names = bytes(payload[at:at + header["names_bytes"]]).decode().split("\n") if n else []
        at += header["names_bytes"]
        keys_bytes = header.get("keys_bytes", 0)  # snapshots before keys: the index is keyed by slot
        keys = np.frombuffer(payload, "<i8", keys_bytes // 8, offset=at).astype(np.int64) if keys_bytes else None
        approx = bytes(payload[at + keys_bytes:])
    except SnapshotError:
        raise
    except (KeyError, ValueError, struct.error) as exc:  # json, utf-8 and numpy errors are ValueErrors
        raise SnapshotError(f"unreadable: {exc}") from exc
    index = faiss.deserialize_index(np.frombuffer(approx, np.uint8)) if approx else None
    return Snapshot(header, slots, names, vectors, index, keys, header.get("next_key", 0))
