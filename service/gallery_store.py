"""Galleries in Redis, the source of truth; each replica's FAISS index follows them.

Keys of gallery <g> (the `{g}` hash tag keeps them in one Redis Cluster slot):
    <prefix>gal:{<g>}:emb    hash: identity id -> its record: slot (int64 LE) + unit embedding (D float32 LE)
    <prefix>gal:{<g>}:slots  hash: slot -> identity id, while the identity is enrolled
    <prefix>gal:{<g>}:seq    the last slot handed out (slots are never reused)
    <prefix>gal:{<g>}:log    stream of changes: op put|del, slot (no ids, no vectors), trimmed to ~LOG_LENGTH

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
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis

from service.template_store import check_id

LOG_LENGTH = 20_000  # changes a replica may fall behind by before it reloads the whole gallery

# KEYS: emb, log, slots, seq; ARGV: id, vector, log length
PUT_LUA = r"""
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

# KEYS: emb, log, slots, seq; ARGV: id, log length
DEL_LUA = r"""
local old = redis.call('HGET', KEYS[1], ARGV[1])
if not old then
  return false
end
local slot = struct.unpack('<i8', old)
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[3], slot)
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'op', 'del', 'slot', slot)
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

    def keys(self, gallery: str) -> tuple[str, str, str, str]:
        """(emb, log, slots, seq)"""
        base = f"{self.prefix}gal:{{{check_id(gallery)}}}"
        return f"{base}:emb", f"{base}:log", f"{base}:slots", f"{base}:seq"

    async def put(self, gallery: str, identity: str, vector: np.ndarray) -> str:
        vec = np.ascontiguousarray(vector, dtype="<f4")
        if vec.shape != (self.dim,):
            raise ValueError(f"expected a ({self.dim},) embedding, got {vec.shape}")
        entry = await self._put(keys=list(self.keys(gallery)), args=[check_id(identity), vec.tobytes(), LOG_LENGTH])
        return entry.decode()

    async def delete(self, gallery: str, identity: str) -> str | None:
        """The log entry of the deletion, or None when the identity was not enrolled."""
        entry = await self._del(keys=list(self.keys(gallery)), args=[check_id(identity), LOG_LENGTH])
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

    async def drop(self, gallery: str) -> None:
        await self.client.delete(*self.keys(gallery))
        if self.on_erase:
            self.on_erase()
