"""Galleries in Redis, the source of truth; each replica's FAISS index follows them.

Keys of gallery <g> (the `{g}` hash tag keeps them in one Redis Cluster slot):
    <prefix>gal:{<g>}:emb    hash: identity id -> its record: slot (int64 LE) + unit embedding (D float32 LE)
    <prefix>gal:{<g>}:slots  hash: slot -> identity id, while the identity is enrolled
    <prefix>gal:{<g>}:seq    the last slot handed out (slots are never reused)
    <prefix>gal:{<g>}:log    stream of changes: op put|del, slot (no ids, no vectors), trimmed to ~LOG_LENGTH
    <prefix>gal:{<g>}:photos hash: identity id -> what its vector was fused from (`Photos`: photo count,
                             quality, and the CAFace memory where it was fused), written with the vector
    <prefix>gal:{<g>}:neg    hash: identity id -> its negatives ("not this person"): n unit vectors (n·D float32 LE)

An identity keeps its slot, an opaque number, from its first enrolment until its deletion, and the
log names identities only by slot: a deletion removes both mappings, so what stays in the log
(`put 17`, `del 17`) identifies nobody. A write is one Lua script that changes the hashes and
appends to the log together, so a replica that applies the log in order always ends at the
hashes' state. A replica catches up by reading the log after the last entry it applied; one that
fell behind the trimmed log (or starts cold) reloads the whole hash, then applies the log from
the entry it read first (re-applying a put or a delete is harmless). A put is applied with the
record the hashes hold when the replica reads the log, resolved in one script: a slot no longer
there was deleted since (its `del` is further on in the log), so the replica still ends at the
hashes' state.

`photos` and `neg` stay in Redis: replicas read them when needed (negatives at search time, for
the shortlist only), so neither the log nor a replica's index holds them, and a deletion removes
them with the vector in the same script.
"""
from __future__ import annotations

import json

from collections.abc import Callable
import struct
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis

from service.errors import Conflict, NotFound
from service.template_store import check_id

LOG_LENGTH = 20_000  # changes a replica may fall behind by before it reloads the whole gallery
MAX_NEGATIVES = 256  # per identity: each costs every search that shortlists the identity a dot product

# KEYS: emb, log, slots, seq, photos; ARGV: id, vector, log length, photos record, expected record
# ('*': write whatever is there; '': only if the identity has no record; else only if it is unchanged)
PUT_LUA = r"""
if ARGV[5] ~= '*' and (redis.call('HGET', KEYS[5], ARGV[1]) or '') ~= ARGV[5] then
  return false
end
redis.call('HSET', KEYS[5], ARGV[1], ARGV[4])
local old = redis.call('HGET', KEYS[1], ARGV[1])
local slot
if old then
  slot = struct.unpack('<i8', old)
else
  slot = redis.call('INCR', KEYS[4])
  redis.call('HSET', KEYS[3], slot, ARGV[1])
end
redis.call('HSET', KEYS[1], ARGV[1], struct.pack('<i8', slot) .. ARGV[2])
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'op', 'put', 'slot', slot)
"""

# KEYS: emb, log, slots, seq, photos, neg; ARGV: id, log length
DEL_LUA = r"""
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then
  return false
end
local slot = struct.unpack('<i8', old)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], slot)
redis.call('HDEL', KEYS[5], ARGV[1])
redis.call('HDEL', KEYS[6], ARGV[1])
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'op', 'del', 'slot', slot)
"""

# KEYS: emb, neg; ARGV: id, vectors, most bytes -> the identity's negatives' bytes, false if it is not
# enrolled, -1 if the vectors would pass the most bytes
NEG_LUA = r"""
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 then
  return false
end
local all = (redis.call('HGET', KEYS[2], ARGV[1]) or '') .. ARGV[2]
if #all > tonumber(ARGV[3]) then
  return -1
end
redis.call('HSET', KEYS[2], ARGV[1], all)
return #all
"""

# KEYS: emb, slots; ARGV: slots -> per slot its id and record, or false where it is gone
RESOLVE_LUA = r"""
local out = {}
for i, slot in ipairs(ARGV) do
  local id = redis.call('HGET', KEYS[2], slot)
  out[2 * i - 1] = id
  out[2 * i] = id and redis.call('HGET', KEYS[1], id)
end
return out
"""


@dataclass(frozen=True)
class Change:
    entry: str  # stream entry id
    op: str  # "put" or "del"
    slot: int
    identity: str | None  # the slot's identity for a put (None for a del)
    vector: np.ndarray | None  # (D,) float32: the hash's vector for a put (None: deleted since)


@dataclass(frozen=True)
class Photos:
    """What an identity's vector was fused from: how many photos, their fused quality (nan: unknown, e.g. an
    embedding sent alone) and, where CAFace fused them, the fusion model's id and the memory: the per-cluster
    sums of every photo ever given (`engines.fusion`, `service.template_store`'s layout, (L,) float64)."""

    count: int
    quality: float
    model: str = ""
    memory: np.ndarray | None = None

    def pack(self) -> bytes:
        model = self.model.encode()
        head = struct.pack("<qdH", self.count, self.quality, len(model)) + model
        return head + (b"" if self.memory is None else np.ascontiguousarray(self.memory, "<f8").tobytes())

    @classmethod
    def unpack(cls, record: bytes) -> Photos:
        count, quality, n = struct.unpack_from("<qdH", record)
        start = struct.calcsize("<qdH") + n
        memory = np.frombuffer(record, "<f8", offset=start).copy() if len(record) > start else None
        return cls(count, quality, record[start - n:start].decode(), memory)


def entry_key(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


def unpack(record: bytes) -> tuple[int, np.ndarray]:
    """(slot, (D,) float32 vector) of an `emb` hash record."""
    return int.from_bytes(record[:8], "little", signed=True), np.frombuffer(record, dtype="<f4", offset=8)


class GalleryStore:
    """`on_erase` is called after each deletion (e.g. to schedule the rewrite of Redis's files)."""

    def __init__(self, client: aioredis.Redis, prefix: str, dim: int, on_erase: Callable[[], None] | None = None) -> None:
        self.client, self.prefix, self.dim, self.on_erase = client, prefix, dim, on_erase
        self._put = client.register_script(PUT_LUA)
        self._del = client.register_script(DEL_LUA)
        self._resolve = client.register_script(RESOLVE_LUA)
        self._neg = client.register_script(NEG_LUA)

    def keys(self, gallery: str) -> tuple[str, str, str, str]:
        """(emb, log, slots, seq)"""
        base = f"{self.prefix}gal:{{{check_id(gallery)}}}"
        return f"{base}:emb", f"{base}:log", f"{base}:slots", f"{base}:seq"

    def identity_keys(self, gallery: str) -> tuple[str, str]:
        """(photos, neg): what Redis keeps beside each identity's vector"""
        base = f"{self.prefix}gal:{{{check_id(gallery)}}}"
        return f"{base}:photos", f"{base}:neg"

    async def put(self, gallery: str, identity: str, vector: np.ndarray, photos: Photos,
                  expected: bytes | None = None) -> str | None:
        """Writes the vector and its `Photos` together; with `expected` (a `photos` record as read, b"" for none)
        only if the identity's record is still that one. The log entry, or None where it was not."""
        vec = np.ascontiguousarray(vector, dtype="<f4")
        if vec.shape != (self.dim,):
            raise ValueError(f"expected a ({self.dim},) embedding, got {vec.shape}")
        args = [check_id(identity), vec.tobytes(), LOG_LENGTH, photos.pack(), b"*" if expected is None else expected]
        entry = await self._put(keys=[*self.keys(gallery), self.identity_keys(gallery)[0]], args=args)
        return entry.decode() if entry else None

    async def photos(self, gallery: str, identity: str) -> bytes | None:
        """The identity's `Photos` record as stored (None: not enrolled); `Photos.unpack` reads it."""
        return await self.client.hget(self.identity_keys(gallery)[0], check_id(identity))

    async def add_negatives(self, gallery: str, identity: str, vectors: np.ndarray) -> int:
        """Appends unit vectors (n, D) to the identity's negatives; returns how many it has."""
        vecs = np.ascontiguousarray(vectors, dtype="<f4")
        size = await self._neg(keys=[self.keys(gallery)[0], self.identity_keys(gallery)[1]],
                               args=[check_id(identity), vecs.tobytes(), MAX_NEGATIVES * self.dim * 4])
        if size is None:
            raise NotFound(f"no identity {identity} in gallery {gallery}")
        if size < 0:
            raise Conflict(f"identity {identity} would have more than {MAX_NEGATIVES} negatives, the most kept")
        return size // (self.dim * 4)

    async def negatives(self, gallery: str, identities: list[str]) -> dict[str, np.ndarray]:
        """Identity -> its negatives (n, D) float32, for those of `identities` that have any."""
        if not identities:
            return {}
        found = await self.client.hmget(self.identity_keys(gallery)[1], identities)
        return {i: np.frombuffer(b, "<f4").reshape(-1, self.dim) for i, b in zip(identities, found) if b}

    async def negative_count(self, gallery: str, identity: str) -> int:
        return await self.client.hstrlen(self.identity_keys(gallery)[1], check_id(identity)) // (self.dim * 4)

    async def delete(self, gallery: str, identity: str) -> str | None:
        """The log entry of the deletion (which takes the identity's photos and negatives too), or None when
        the identity was not enrolled."""
        keys = [*self.keys(gallery), *self.identity_keys(gallery)]
        entry = await self._del(keys=keys, args=[check_id(identity), LOG_LENGTH])
        if entry and self.on_erase:
            self.on_erase()
        return entry.decode() if entry else None

    async def snapshot(self, gallery: str) -> tuple[str, dict[int, tuple[str, np.ndarray]]]:
        """(the log's last entry before reading, slot -> (identity, vector) of everyone): the state to rebuild from."""
        emb, log, *_ = self.keys(gallery)
        last = await self.client.xrevrange(log, count=1)
        start = last[0][0].decode() if last else "0-0"
        records = {}
        async for identity, record in self.client.hscan_iter(emb, count=1000):
            slot, vector = unpack(record)
            records[slot] = identity.decode(), vector
        return start, records

    async def changes_after(self, gallery: str, entry: str, count: int = 1000) -> tuple[list[Change], bool]:
        """Log entries after `entry` (at most `count`), and whether entries after it may have been trimmed away."""
        emb, log, slots, _ = self.keys(gallery)
        first = await self.client.xrange(log, count=1)
        # the oldest kept entry is newer than ours: what came between may be trimmed away
        gap = bool(first) and entry != "0-0" and entry_key(first[0][0].decode()) > entry_key(entry)
        raw = await self.client.xrange(log, min=f"({entry}", count=count)
        entries = [(e.decode(), f[b"op"].decode(), int(f[b"slot"])) for e, f in raw]
        puts = sorted({slot for _, op, slot in entries if op == "put"})
        found = await self._resolve(keys=[emb, slots], args=puts) if puts else []
        records = {slot: (ident.decode(), unpack(rec)[1]) for slot, ident, rec in zip(puts, found[::2], found[1::2])
                   if ident is not None}
        changes = []
        for entry_id, op, slot in entries:
            if op == "put" and slot in records:
                changes.append(Change(entry_id, "put", slot, *records[slot]))
            else:  # a del, or a put whose slot is gone since (its del follows further on)
                changes.append(Change(entry_id, "del", slot, None, None))
        return changes, gap

    def calibration_key(self, gallery: str) -> str:
        """The gallery's own FPIR calibration (service.gallery.GalleryService.open_set): two numbers, no face."""
        return f"{self.prefix}gal:{{{check_id(gallery)}}}:fpir"

    async def calibration(self, gallery: str) -> dict | None:
        raw = await self.client.get(self.calibration_key(gallery))
        return json.loads(raw) if raw else None

    async def set_calibration(self, gallery: str, fitted: dict) -> None:
        await self.client.set(self.calibration_key(gallery), json.dumps(fitted))

    async def drop(self, gallery: str) -> None:
        await self.client.delete(*self.keys(gallery), *self.identity_keys(gallery), self.calibration_key(gallery))
        if self.on_erase:
            self.on_erase()
