"""Where a gallery's searches run (service.gallery_index placements): the GPU path's logic on the CPU.

The GPU placement searches a copy of the approximate index uploaded after every batch of changes; here a
CPU clone stands in for that copy (it goes stale exactly as a GPU copy would unless it is re-uploaded), so
removal and re-enrolment run through the same code as on a GPU.
"""
from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from service.gallery import IndexOptions
from service.gallery_index import GPU_RESOURCES, PLACEMENTS, CpuPlacement, GalleryDeviceError, GalleryIndex, Shared
from service.gallery_store import Change
from service.settings import Settings

DIM = 32


class ClonePlacement(CpuPlacement):
    """The GPU placement's shape with a CPU clone for the device copy."""

    label = "clone"

    def upload(self, index: faiss.Index) -> faiss.Index:
        return faiss.clone_index(index)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)  # (n, D)


def exact(vectors: dict[str, np.ndarray], queries: np.ndarray, k: int) -> list[list[str]]:
    names = list(vectors)
    sims = queries @ np.stack([vectors[n] for n in names]).T  # (Q, N)
    return [[names[i] for i in np.argsort(-row)[:k]] for row in sims]


@pytest.fixture
def clone_index(monkeypatch) -> GalleryIndex:
    monkeypatch.setitem(PLACEMENTS, "clone", ClonePlacement)
    rng = np.random.default_rng(0)
    idx = GalleryIndex(DIM, exact_max=100, probe=1.0, device="clone")
    idx.load("1-0", np.arange(2000), [f"id{i}" for i in range(2000)], unit(rng, 2000))
    idx.build()  # the approximate index, uploaded
    return idx


def test_removal_and_re_enrolment_reach_the_searched_copy(clone_index):
    idx, rng = clone_index, np.random.default_rng(1)
    assert idx.searched is not idx.approx and idx.describe().startswith("faiss IVF") and "(clone;" in idx.describe()
    stale = idx.searched
    held = {idx.names[s]: idx.vectors[r].copy() for s, r in idx.rows.items()}
    moved = unit(rng, 50)
    changes = [Change(f"2-{i}", "del", s, None, None) for i, s in enumerate(range(0, 300, 3))]  # removed
    changes += [Change(f"3-{i}", "put", s, f"id{s}", moved[i]) for i, s in enumerate(range(1, 100, 2))]  # re-enrolled
    changes += [Change(f"4-{i}", "put", 5000 + i, f"new{i}", v) for i, v in enumerate(unit(rng, 20))]  # added
    idx.apply(changes)
    for c in changes:
        if c.op == "del":
            held.pop(f"id{c.slot}")
        else:
            held[c.identity] = c.vector
    # removals and re-enrolments retire entries (service.gallery_index's tombstones); re-enrolments and additions
    # add entries: 2,000 + 50 + 20 in the index, of which the live ones are exactly the held identities
    assert idx.searched is not stale and idx.searched.ntotal == idx.approx.ntotal == 2000 + 50 + 20
    retired = set(range(0, 300, 3)) | set(range(1, 100, 2))  # each of these slots' original entry, once
    assert sorted(idx.names[s] for s in idx.key_of) == sorted(held) and idx.retired == len(retired)
    queries = np.concatenate([moved[:20], unit(rng, 20)])  # the re-enrolled faces, and strangers
    found = idx.search_now(queries, 10)  # a removed slot in the copy would raise KeyError here
    assert [[name for name, _ in row] for row in found] == exact(held, queries, 10)
    assert [row[0][0] for row in found[:20]] == [f"id{s}" for s in range(1, 41, 2)]


def test_a_copy_not_uploaded_again_would_miss_the_changes(clone_index):
    """What the upload after apply() is for: the copy taken before a re-enrolment does not hold the new face's
    entry, the uploaded one does (and the retired entry of the old face is never proposed again)."""
    idx = clone_index
    stale, face = idx.searched, unit(np.random.default_rng(9), 1)
    idx.apply([Change("2-0", "put", 7, "id7", face[0])])
    new_key = idx.key_of[7]
    assert new_key != 7 and idx.key_rows[7] == -1  # the old entry (keyed 7) is retired
    assert stale.search(face, 1)[1][0, 0] != new_key and idx.searched.search(face, 1)[1][0, 0] == new_key
    assert idx.search_now(face, 1)[0][0][0] == "id7"
    idx.apply([Change("3-0", "del", 7, None, None)])
    assert idx.searched.search(face, 1)[1][0, 0] == new_key  # the entry stays in the index...
    assert "id7" not in [name for name, _ in idx.search_now(face, 10)[0]]  # ... and is never proposed again


def test_the_device_is_reported():
    assert GalleryIndex(DIM, 100, 1.0).describe() == "faiss exact inner product (cpu)"


def test_gpu_resources_are_made_once_per_process_on_first_use():
    made = []
    shared = Shared(lambda: made.append(object()) or made[-1])
    assert made == []  # nothing before the first use
    got = []
    threads = [threading.Thread(target=lambda: got.append(shared.get())) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(made) == 1 and all(g is made[0] for g in got)
    assert isinstance(GPU_RESOURCES, Shared)  # what every GPU placement takes its resources from


def test_the_gpu_device_is_refused_at_start_without_faiss_gpu_or_a_gpu():
    settings = Settings(gallery_device="gpu")
    if hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0:
        assert IndexOptions.from_settings(settings).device == "gpu"
        assert GalleryIndex(DIM, 100, 1.0, "gpu").describe() == "faiss exact inner product (gpu 0)"
        return
    with pytest.raises(GalleryDeviceError, match="faiss-gpu"):
        IndexOptions.from_settings(settings)
    with pytest.raises(GalleryDeviceError):
        GalleryIndex(DIM, 100, 1.0, "gpu")


def test_keys_rows_and_retired_entries_stay_consistent_through_every_change():
    """The approximate index's bookkeeping (keys, rows, retired entries) against the truth, through random
    enrolments, re-enrolments and deletions, a rebuild with changes applied while it trains, a compaction and a
    snapshot round trip: with every list probed and a shortlist longer than the gallery, the approximate search
    must give exactly the exact answer over the identities held."""
    import tempfile
    from pathlib import Path

    from service.gallery_index import read_snapshot, write_snapshot

    rng = np.random.default_rng(21)
    idx = GalleryIndex(DIM, exact_max=50, probe=1.0)
    held = {f"id{i}": v for i, v in enumerate(unit(rng, 1500))}
    idx.load("1-0", np.arange(1500), list(held), np.stack(list(held.values())))
    idx.build()
    slot_of = {f"id{i}": i for i in range(1500)}
    entry = iter(range(2, 10**6))

    def changes(n):
        out = []
        for _ in range(n):
            op = rng.choice(["new", "again", "del"])
            if op == "new":
                name = f"new{next(entry)}"
                slot_of[name] = 10_000 + len(slot_of)
            else:
                name = rng.choice(sorted(held))
            if op == "del":
                out.append(Change(f"{next(entry)}-0", "del", slot_of[name], None, None))
                held.pop(name)
            else:
                held[name] = unit(rng, 1)[0]
                out.append(Change(f"{next(entry)}-0", "put", slot_of[name], name, held[name]))
        return out

    def agrees(index):
        queries = unit(rng, 30)
        assert index.approx.ntotal == len(index) + index.retired and len(index) == len(held)
        assert [[name for name, _ in row] for row in index.search_now(queries, 5)] == exact(held, queries, 5)

    idx.apply(changes(400))
    agrees(idx)
    building = threading.Thread(target=idx.build)  # changes land while it trains: replayed at the swap
    building.start()
    for _ in range(20):
        idx.apply(changes(10))
    building.join()
    agrees(idx)
    idx.apply(changes(200))
    idx.compact()
    assert idx.retired == 0 and idx.erased == 0
    agrees(idx)
    idx.apply(changes(100))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "g.snapshot"
        write_snapshot(path, idx, {"gallery": "g"})
        snap = read_snapshot(path, DIM)
    copy = GalleryIndex(DIM, exact_max=50, probe=1.0)
    copy.load(snap.header["entry"], snap.slots, snap.names, snap.vectors, snap.approx, snap.keys, snap.next_key)
    agrees(copy)
    copy.apply(changes(100))
    agrees(copy)
