"""CAFace template memories in Redis: one atomic, commutative append per call, frame ids deduplicated.

A template's memory is a fixed-length vector of float64 sums (the fusion model's per-cluster
feature sums, style sums and assignment counts, `engines.fusion`), whatever the number of
frames. Appending frames adds their per-frame contributions to it inside one Lua script, so:

- concurrent appends from any number of replicas serialise in Redis and lose nothing;
- additions commute: any order or batching of the same frames gives the same memory (up to the
  last bit of float64 rounding);
- a client's `frame_id` is remembered in a per-template window of the most recent ids, and a
  frame whose id is already there is reported as a duplicate and not added (clients retry);
- a call is all or nothing: a connection killed mid-call leaves the memory before or after it.

Keys (the `{id}` hash tag keeps a template's keys in one Redis Cluster slot):
    <prefix>tpl:{<id>}        hash: sum (L little-endian float64), frames, seq, model
    <prefix>tpl:{<id>}:ids    sorted set: frame id -> append sequence number (the dedupe window)

`model` names the fusion model (and through it the recognition model) whose contributions the
sums hold; appending with another model is refused, as the sums would be meaningless together.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from service.errors import Conflict, InvalidInput, NotFound

ID_PATTERN = re.compile(r"^[A-Za-z0-9._:@-]{1,128}$")

APPEND_LUA = r"""
-- KEYS[1] memory hash, KEYS[2] frame-id window (sorted set)
-- ARGV: model, L (float64 per frame), window, n, then n × (frame id or '', L packed float64)
local model, L, window, n = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local stored = redis.call('HGET', KEYS[1], 'model')
if stored and stored ~= model then
  return redis.error_reply('MODEL_MISMATCH ' .. stored)
end
local acc = {}
local blob = redis.call('HGET', KEYS[1], 'sum')
for j = 1, L do
  acc[j] = blob and struct.unpack('<d', blob, 8 * j - 7) or 0.0
end
local frames = tonumber(redis.call('HGET', KEYS[1], 'frames') or '0')
local seq = tonumber(redis.call('HGET', KEYS[1], 'seq') or '0')
local added = {}
for k = 1, n do
  local fid, delta = ARGV[3 + 2 * k], ARGV[4 + 2 * k]
  if fid ~= '' and redis.call('ZSCORE', KEYS[2], fid) then
    added[k] = 0
  else
    for j = 1, L do
      acc[j] = acc[j] + struct.unpack('<d', delta, 8 * j - 7)
    end
    frames = frames + 1
    if fid ~= '' then
      seq = seq + 1
      redis.call('ZADD', KEYS[2], seq, fid)
    end
    added[k] = 1
  end
end
local parts = {}
for j = 1, L do
  parts[j] = struct.pack('<d', acc[j])
end
local sum = table.concat(parts)
redis.call('HSET', KEYS[1], 'sum', sum, 'frames', frames, 'seq', seq, 'model', model)
if window > 0 then
  redis.call('ZREMRANGEBYRANK', KEYS[2], 0, -window - 1)
end
return {frames, sum, added}
"""


@dataclass(frozen=True)
class Memory:
    sums: np.ndarray  # (L,) float64
    frames: int


@dataclass(frozen=True)
class AppendResult:
    memory: Memory
    added: list[bool]  # per frame of the call: False = a duplicate frame id, not counted again


def check_id(template_id: str) -> str:
    if not ID_PATTERN.match(template_id):
        raise InvalidInput("template id: 1-128 characters of letters, digits and . _ : @ -")
    return template_id


class TemplateStore:
    """Template memories of length `length` under `prefix`, written by fusion model `model`; `on_erase` is
    called after each deletion (e.g. to schedule the rewrite of Redis's files)."""

    def __init__(self, client: aioredis.Redis, prefix: str, length: int, model: str, id_window: int = 4096,
                 on_erase: Callable[[], None] | None = None) -> None:
        self.client, self.prefix, self.length, self.model, self.id_window = client, prefix, length, model, id_window
        self.on_erase = on_erase
        self._append = client.register_script(APPEND_LUA)

    def keys(self, template_id: str) -> tuple[str, str]:
        base = f"{self.prefix}tpl:{{{check_id(template_id)}}}"
        return base, f"{base}:ids"

    async def append(self, template_id: str, deltas: np.ndarray, frame_ids: list[str | None]) -> AppendResult:
        """Add each frame's contribution (N, L) unless its frame id was seen; one atomic script call."""
        deltas = np.ascontiguousarray(deltas, dtype="<f8")
        if deltas.ndim != 2 or deltas.shape[1] != self.length or len(frame_ids) != len(deltas):
            raise ValueError(f"expected ({len(frame_ids)}, {self.length}) contributions, got {deltas.shape}")
        args: list = [self.model, self.length, self.id_window, len(deltas)]
        for fid, row in zip(frame_ids, deltas):
            args += [fid or "", row.tobytes()]
        try:
            frames, blob, added = await self._append(keys=list(self.keys(template_id)), args=args)
        except ResponseError as exc:
            if str(exc).startswith("MODEL_MISMATCH"):
                raise Conflict(f"template {template_id} was built with fusion model {str(exc).split(' ', 1)[1]}, "
                               f"not {self.model}; delete it to start again") from None
            raise
        return AppendResult(Memory(np.frombuffer(blob, dtype="<f8").copy(), int(frames)), [bool(a) for a in added])

    async def read(self, template_id: str) -> Memory:
        key, _ = self.keys(template_id)
        blob, frames, model = await self.client.hmget(key, ["sum", "frames", "model"])
        if blob is None:
            raise NotFound(f"no template {template_id}")
        if model.decode() != self.model:
            raise Conflict(f"template {template_id} was built with fusion model {model.decode()}, not {self.model}")
        return Memory(np.frombuffer(blob, dtype="<f8").copy(), int(frames))

    async def delete(self, template_id: str) -> None:
        removed = await self.client.delete(*self.keys(template_id))
        if not removed:
            raise NotFound(f"no template {template_id}")
        if self.on_erase:
            self.on_erase()

    async def memory_bytes(self, template_id: str) -> dict[str, int]:
        """Redis's own account of the bytes each key of a template takes (MEMORY USAGE)."""
        key, ids = self.keys(template_id)
        return {"memory": int(await self.client.memory_usage(key) or 0),
                "frame_ids": int(await self.client.memory_usage(ids) or 0)}
