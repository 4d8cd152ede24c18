"""Dynamic batching for the serving path: many small requests, one inference per batch.

    batcher = DynamicBatcher(engine, max_batch_size=32, max_delay_ms=5)
    await batcher.start()
    out = await batcher.run(x)            # x (n, 3, S, S) float32, preprocessed -> {"embedding": (n, D), …}
    await batcher.stop()                  # drains what is queued (stop(drain=False) fails it)

Requests queue. One worker takes the oldest request and keeps adding queued ones until the batch
holds max_batch_size faces or max_delay_ms has passed since that oldest request was queued; then
the batch runs as ONE `engine.run` call on a dedicated thread (the event loop never blocks on
inference), and each caller gets its own rows of every output the engine returns. While a batch runs, new requests queue; the
next batch starts as soon as the previous one returns, so under load batches fill without waiting
and a lone request waits at most max_delay_ms.

Trade-offs of the two settings: a larger max_batch_size raises throughput (better use of the
hardware per call) and the latency of every face in the batch; a larger max_delay_ms fills
batches at low load at the cost of that much added latency for a lone request.

A request larger than max_batch_size is split into parts that queue one after another; its
caller gets the rows reassembled in order. A failing inference fails exactly the callers whose
rows were in that batch. Metrics: every batch produces a `BatchRecord` passed to `on_batch`
(e.g. to Prometheus histograms) and summed in `stats`.

Nothing here imports torch.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from engines.base import Engine, EngineInputError

log = logging.getLogger(__name__)

__all__ = ["BatchRecord", "BatcherClosedError", "BatcherStats", "DynamicBatcher"]


class BatcherClosedError(RuntimeError):
    """The batcher is not running (not started, stopping or stopped): the request was not, or will not be, run."""


@dataclass(frozen=True)
class BatchRecord:
    """One inference: what the metrics hooks receive.

    size: faces in the batch; requests: request parts in it; queue_wait_s: for each part, seconds
    from being queued to the batch starting; inference_s: seconds of the engine call; error: the
    exception's type name when the call failed, else None.
    """

    size: int
    requests: int
    queue_wait_s: tuple[float, ...]
    inference_s: float
    error: str | None = None


@dataclass
class BatcherStats:
    """Running totals over every batch (sizes: batch size -> how many batches had it)."""

    batches: int = 0
    faces: int = 0
    failed_batches: int = 0
    inference_s: float = 0.0
    queue_wait_s: float = 0.0
    sizes: Counter = field(default_factory=Counter)

    def add(self, record: BatchRecord) -> None:
        self.batches += 1
        self.faces += record.size
        self.failed_batches += record.error is not None
        self.inference_s += record.inference_s
        self.queue_wait_s += sum(record.queue_wait_s)
        self.sizes[record.size] += 1


@dataclass
class _Request:
    x: np.ndarray  # (n ≤ max_batch_size, 3, S, S)
    future: asyncio.Future
    queued_at: float


_STOP = object()  # queued by stop(): everything queued before it is served, then the worker ends


class DynamicBatcher:
    """Batches concurrent `run` calls on one engine; see the module docstring.

    engine: any `Engine`. Its own max_batch_size caps the batch, so a batch is one inference.
    max_batch_size: the most faces per inference (default: the engine's).
    max_delay_ms: how long the oldest queued request may wait for others to join its batch.
    on_batch: called on the event loop with each batch's `BatchRecord`; an exception in it is
        logged, never passed to callers.
    """

    def __init__(self, engine: Engine, max_batch_size: int | None = None, max_delay_ms: float = 5.0,
                 on_batch: Callable[[BatchRecord], None] | None = None) -> None:
        if max_batch_size is not None and max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must not be negative, got {max_delay_ms}")
        self.engine = engine
        self.max_batch_size = min(max_batch_size or engine.max_batch_size, engine.max_batch_size)
        self.max_delay_s = max_delay_ms / 1000.0
        self.on_batch = on_batch
        self.stats = BatcherStats()
        self._queue: asyncio.Queue | None = None
        self._carry: deque[_Request] = deque()  # taken from the queue but did not fit the last batch
        self._worker: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._accepting = False

    # ---- lifecycle ---------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._accepting

    async def start(self) -> None:
        """Start the worker on the running event loop; the batcher then accepts requests."""
        if self._worker is not None:
            raise RuntimeError("the batcher is already started")
        self._queue = asyncio.Queue()
        # one thread: one inference at a time, in order; the engine may use many cores inside it
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="batcher")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name="dynamic-batcher")
        self._accepting = True

    async def stop(self, drain: bool = True) -> None:
        """Stop accepting requests. drain=True serves everything queued first; drain=False fails
        it with BatcherClosedError (a batch already running still completes). Idempotent."""
        if self._worker is None:
            return
        self._accepting = False
        if not drain:
            self._fail_queued(BatcherClosedError("the batcher was stopped before this request ran"))
        self._queue.put_nowait(_STOP)
        try:
            await self._worker
        finally:
            self._executor.shutdown(wait=False)
            self._worker = None

    async def __aenter__(self) -> DynamicBatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.stop()

    def _fail_queued(self, error: Exception) -> None:
        pending = list(self._carry)
        self._carry.clear()
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not _STOP:
                pending.append(item)
        for request in pending:
            if not request.future.done():
                request.future.set_exception(error)

    # ---- requests ----------------------------------------------------------------------
    async def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """(n, 3, S, S) float32 preprocessed faces -> {name: (n, width)} for every output of the engine."""
        s = self.engine.input_size
        if not isinstance(x, np.ndarray) or x.dtype != np.float32 or x.ndim != 4 or x.shape[1:] != (3, s, s):
            # checked here, not in the batch: one malformed request must not fail its batch-mates
            raise EngineInputError(f"expected float32 (n, 3, {s}, {s}), got "
                                   f"{getattr(x, 'dtype', type(x).__name__)} {getattr(x, 'shape', '')}")
        if not self._accepting:
            raise BatcherClosedError("the batcher is not running (start() it; stop() was called?)")
        if not len(x):
            return {name: np.zeros((0, width), np.float32) for name, width in self.engine.outputs.items()}
        loop = asyncio.get_running_loop()
        step = self.max_batch_size
        now = time.monotonic()
        parts = [_Request(x[i : i + step], loop.create_future(), now) for i in range(0, len(x), step)]
        for part in parts:
            self._queue.put_nowait(part)
        rows = await asyncio.gather(*(part.future for part in parts))
        if len(rows) == 1:
            return rows[0]
        return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}  # {name: (n, width)}

    # ---- the worker --------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            batch, stopping = await self._next_batch()
            if batch:
                await self._infer(batch)
            if stopping:
                return

    async def _take(self, timeout: float | None):
        """The next request (carried over first), or None when `timeout` passes first."""
        if self._carry:
            return self._carry.popleft()
        if timeout is None:
            return await self._queue.get()
        if timeout <= 0:
            return None if self._queue.empty() else self._queue.get_nowait()
        try:
            return await asyncio.wait_for(self._queue.get(), timeout)  # a timed-out get loses no item
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            return None

    async def _next_batch(self) -> tuple[list[_Request], bool]:
        """Requests for one inference (≤ max_batch_size faces), and whether stop() was reached."""
        batch: list[_Request] = []
        size, deadline = 0, None
        while size < self.max_batch_size:
            timeout = None if deadline is None else deadline - time.monotonic()
            item = await self._take(timeout)
            if item is None:
                break
            if item is _STOP:
                return batch, True
            if item.future.done():  # its caller was cancelled, or stop(drain=False) failed it
                continue
            if size + len(item.x) > self.max_batch_size:
                self._carry.append(item)  # it opens the next batch
                break
            batch.append(item)
            size += len(item.x)
            deadline = deadline if deadline is not None else item.queued_at + self.max_delay_s
        return batch, False

    async def _infer(self, batch: list[_Request]) -> None:
        started = time.monotonic()
        x = batch[0].x if len(batch) == 1 else np.concatenate([r.x for r in batch])  # (N, 3, S, S)
        error: BaseException | None = None
        try:
            out = await asyncio.get_running_loop().run_in_executor(self._executor, self.engine.run, x)
            self._check(out, len(x))
        except Exception as exc:  # delivered to this batch's callers; the worker goes on serving
            error = exc
        ended = time.monotonic()
        offset = 0
        for request in batch:
            n = len(request.x)
            if not request.future.done():
                if error is None:
                    request.future.set_result({name: out[name][offset : offset + n] for name in self.engine.outputs})
                else:
                    request.future.set_exception(error)
            offset += n
        self._record(BatchRecord(size=len(x), requests=len(batch),
                                 queue_wait_s=tuple(started - r.queued_at for r in batch),
                                 inference_s=ended - started, error=type(error).__name__ if error else None))

    def _check(self, out, n: int) -> None:
        """One row per face in every declared output: a broken engine fails its batch, not the slicing."""
        expected = {name: (n, width) for name, width in self.engine.outputs.items()}
        got = ({name: getattr(out.get(name), "shape", None) for name in expected} if isinstance(out, dict)
               else type(out).__name__)
        if got != expected:
            raise RuntimeError(f"{self.engine.name}: run returned {got} for a batch of {n}, expected {expected}")

    def _record(self, record: BatchRecord) -> None:
        self.stats.add(record)
        if self.on_batch is None:
            return
        try:
            self.on_batch(record)
        except Exception:  # a broken metrics hook must not take serving down
            log.exception("batcher on_batch hook failed")
