"""Galleries in Redis, the source of truth; each replica's FAISS index follows them.

Keys of gallery <g> (the `{g}` hash tag keeps them in one Redis Cluster slot):
    <prefix>gal:{<g>}:emb    hash: identity id -> its unit embedding (D little-endian float32)
    <prefix>gal:{<g>}:log    stream of changes: op put|del, id (no vectors), trimmed to ~LOG_LENGTH

A write is one Lua script that changes the hash and appends to the log together, so a replica
that applies the log in order always ends at the hash's state. A replica catches up by reading
the log after the last entry it applied; one that fell behind the trimmed log (or starts cold)
reloads the whole hash, then applies the log from the entry it read first (re-applying a put or
a delete is harmless). A put is applied with the identity's vector as the hash holds it when the
replica reads the log: a later put or delete of the same identity is further on in the log, so
the replica still ends at the hash's state, and the log stays small (ids only).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis

from service.template_store import check_id

LOG_LENGTH = 20_000  # changes a replica may fall behind by before it reloads the whole gallery

PUT_LUA = r"""
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[3], '*', 'op', 'put', 'id', ARGV[1])
"""

DEL_LUA = r"""
if redis.call('HDEL', KEYS[1], ARGV[1]) == 0 then
  return false
end
return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*', 'op', 'del', 'id', ARGV[1])
"""


@dataclass(frozen=True)
class Change:
    entry: str  # stream entry id
    op: str  # "put" or "del"
    identity: str
    vector: np.ndarray | None  # (D,) float32: the hash's vector for a put (None: deleted since)


def entry_key(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


class GalleryStore:
    def __init__(self, client: aioredis.Redis, prefix: str, dim: int) -> None:
        self.client, self.prefix, self.dim = client, prefix, dim
        self._put = client.register_script(PUT_LUA)
        self._del = client.register_script(DEL_LUA)

    def keys(self, gallery: str) -> tuple[str, str]:
        base = f"{self.prefix}gal:{{{check_id(gallery)}}}"
        return f"{base}:emb", f"{base}:log"

    async def put(self, gallery: str, identity: str, vector: np.ndarray) -> str:
        vec = np.ascontiguousarray(vector, dtype="<f4")
        if vec.shape != (self.dim,):
            raise ValueError(f"expected a ({self.dim},) embedding, got {vec.shape}")
        entry = await self._put(keys=list(self.keys(gallery)), args=[check_id(identity), vec.tobytes(), LOG_LENGTH])
        return entry.decode()

    async def delete(self, gallery: str, identity: str) -> str | None:
        """The log entry of the deletion, or None when the identity was not enrolled."""
        entry = await self._del(keys=list(self.keys(gallery)), args=[check_id(identity), LOG_LENGTH])
        return entry.decode() if entry else None

    async def snapshot(self, gallery: str) -> tuple[str, dict[str, np.ndarray]]:
        """(the log's last entry before reading, every identity's vector): the state to rebuild from."""
        emb, log = self.keys(gallery)
        last = await self.client.xrevrange(log, count=1)
        start = last[0][0].decode() if last else "0-0"
        vectors = {}
        async for identity, blob in self.client.hscan_iter(emb, count=1000):
            vectors[identity.decode()] = np.frombuffer(blob, dtype="<f4")
        return start, vectors

    async def changes_after(self, gallery: str, entry: str, count: int = 1000) -> tuple[list[Change], bool]:
        """Log entries after `entry` (at most `count`), and whether entries after it may have been trimmed away."""
        _, log = self.keys(gallery)
        first = await self.client.xrange(log, count=1)
        # the oldest kept entry is newer than ours: what came between may be trimmed away
        gap = bool(first) and entry != "0-0" and entry_key(first[0][0].decode()) > entry_key(entry)
        raw = await self.client.xrange(log, min=f"({entry}", count=count)
        entries = [(e.decode(), f[b"op"].decode(), f[b"id"].decode()) for e, f in raw]
        puts = sorted({identity for _, op, identity in entries if op == "put"})
        blobs = dict(zip(puts, await self.client.hmget(self.keys(gallery)[0], puts))) if puts else {}
        changes = []
        for entry_id, op, identity in entries:
            blob = blobs.get(identity) if op == "put" else None
            vec = np.frombuffer(blob, dtype="<f4") if blob is not None else None
            changes.append(Change(entry_id, op if vec is not None else "del", identity, vec))
        return changes, gap

    async def drop(self, gallery: str) -> None:
        await self.client.delete(*self.keys(gallery))
