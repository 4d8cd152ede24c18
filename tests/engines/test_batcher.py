from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from engines.base import EngineInputError, preprocess
from engines.batcher import BatcherClosedError, BatchRecord, DynamicBatcher
from tests.helpers import cosines, faces

S, D = 4, 3
POISON = -1.0  # a face whose first value is POISON makes the stub engine raise


class StubEngine:
    """A NumPy engine with two outputs, each a known function of each face, recording every call's batch size.

    embedding_n = (Σ x_n, max x_n, x_n[0, 0, 0]), style_n = (min x_n, x_n[2, S−1, S−1]): each row
    depends on its own face only, so wrong rows or a wrong order in either output show up as wrong values.
    """

    name, max_batch_size, input_size, embedding_size = "stub", 64, S, D
    outputs = {"embedding": D, "style": 2}

    def __init__(self, delay_s: float = 0.0, max_batch_size: int = 64) -> None:
        self.calls: list[int] = []
        self.threads: set[str] = set()
        self.delay_s, self.max_batch_size = delay_s, max_batch_size

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        self.calls.append(len(batch))
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay_s)
        if (batch[:, 0, 0, 0] == POISON).any():
            raise ValueError("poisoned face")
        return expected(batch)

    def health(self) -> bool:
        return True


def expected(x: np.ndarray) -> dict[str, np.ndarray]:
    flat = x.reshape(len(x), -1).astype(np.float64)  # (n, 3·S·S)
    return {"embedding": np.stack([flat.sum(1), flat.max(1), flat[:, 0]], axis=1).astype(np.float32),  # (n, D)
            "style": np.stack([flat.min(1), flat[:, -1]], axis=1).astype(np.float32)}  # (n, 2)


def assert_outputs(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def inputs(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, 3, S, S), dtype=np.float32)


async def started(batcher: DynamicBatcher) -> DynamicBatcher:
    await batcher.start()
    return batcher


# ---------------------------------------------------------------- batching behaviour (stub)


def test_16_concurrent_single_face_requests_get_their_rows_in_few_calls():
    engine = StubEngine()
    x = inputs(16)

    async def main():
        async with DynamicBatcher(engine, max_batch_size=8, max_delay_ms=50) as batcher:
            return await asyncio.gather(*(batcher.run(x[i : i + 1]) for i in range(16)))

    rows = asyncio.run(main())
    for i, row in enumerate(rows):
        assert_outputs(row, expected(x[i : i + 1]))  # every output, sliced to each caller's row
    assert engine.calls == [8, 8]  # all 16 were queued together: two full batches, one call each
    assert engine.threads == {"batcher_0"}  # inference ran off the event loop's thread


def test_a_lone_request_waits_max_delay_then_runs():
    engine = StubEngine()

    async def timed(delay_ms):
        async with DynamicBatcher(engine, max_batch_size=8, max_delay_ms=delay_ms) as batcher:
            start = time.monotonic()
            out = await batcher.run(inputs(1))
            return out, time.monotonic() - start

    out, waited = asyncio.run(timed(150))
    assert_outputs(out, expected(inputs(1)))
    assert 0.14 <= waited < 1.0
    _, quick = asyncio.run(timed(0))
    assert quick < 0.1


def test_the_worker_serves_on_after_the_delay_times_out():
    """A lone request makes the worker wait out max_delay_ms on the queue (asyncio.wait_for timing out, which is
    not the builtin TimeoutError before Python 3.11): the request is served and the worker lives for the next."""
    engine = StubEngine()

    async def main():
        async with DynamicBatcher(engine, max_batch_size=8, max_delay_ms=20) as batcher:
            # bounded: a worker killed by the timeout would leave the request waiting forever
            return [await asyncio.wait_for(batcher.run(inputs(1, seed=i)), timeout=5) for i in range(3)]

    for i, out in enumerate(asyncio.run(main())):
        assert_outputs(out, expected(inputs(1, seed=i)))
    assert engine.calls == [1, 1, 1]


def test_a_full_batch_does_not_wait_for_the_delay():
    engine = StubEngine()

    async def main():
        async with DynamicBatcher(engine, max_batch_size=4, max_delay_ms=10_000) as batcher:
            start = time.monotonic()
            await asyncio.gather(*(batcher.run(inputs(1, seed=i)) for i in range(4)))
            return time.monotonic() - start

    assert asyncio.run(main()) < 2.0
    assert engine.calls == [4]


def test_an_oversize_request_is_split_and_reassembled():
    engine = StubEngine()
    x = inputs(10)

    async def main():
        async with DynamicBatcher(engine, max_batch_size=4, max_delay_ms=1) as batcher:
            return await batcher.run(x)

    assert_outputs(asyncio.run(main()), expected(x))  # every output's parts reassembled in order
    assert engine.calls == [4, 4, 2]


def test_the_engines_own_max_batch_size_caps_the_batch():
    batcher = DynamicBatcher(StubEngine(max_batch_size=5), max_batch_size=32)
    assert batcher.max_batch_size == 5
    assert DynamicBatcher(StubEngine(max_batch_size=5)).max_batch_size == 5


def test_an_engine_error_reaches_exactly_the_callers_of_that_batch():
    engine = StubEngine()
    x = inputs(4)
    x[0, 0, 0, 0] = POISON  # request 0 poisons batch 1 = requests 0, 1; batch 2 = requests 2, 3

    async def main():
        async with DynamicBatcher(engine, max_batch_size=2, max_delay_ms=50) as batcher:
            results = await asyncio.gather(*(batcher.run(x[i : i + 1]) for i in range(4)), return_exceptions=True)
            after = await batcher.run(x[3:4])  # the worker survives a failed batch
            return results, after

    results, after = asyncio.run(main())
    assert engine.calls == [2, 2, 1]
    assert all(isinstance(r, ValueError) and "poisoned" in str(r) for r in results[:2])
    for i in (2, 3):
        assert_outputs(results[i], expected(x[i : i + 1]))
    assert_outputs(after, expected(x[3:4]))


def test_an_engine_that_drops_a_declared_output_fails_its_batch():
    class NoStyle(StubEngine):
        def run(self, batch):
            return {"embedding": super().run(batch)["embedding"]}

    async def main():
        async with DynamicBatcher(NoStyle(), max_delay_ms=0) as batcher:
            return await asyncio.gather(batcher.run(inputs(2)), return_exceptions=True)

    (error,) = asyncio.run(main())
    assert isinstance(error, RuntimeError) and "'style': None" in str(error)


def test_stop_drains_the_queue_then_refuses_requests():
    engine = StubEngine(delay_s=0.05)

    async def main():
        batcher = await started(DynamicBatcher(engine, max_batch_size=1, max_delay_ms=0))
        tasks = [asyncio.create_task(batcher.run(inputs(1, seed=i))) for i in range(3)]
        await asyncio.sleep(0.01)  # all three queued, the first running
        await batcher.stop()
        with pytest.raises(BatcherClosedError):
            await batcher.run(inputs(1))
        return await asyncio.gather(*tasks)

    rows = asyncio.run(main())
    for i, row in enumerate(rows):
        assert_outputs(row, expected(inputs(1, seed=i)))


def test_stop_without_draining_fails_the_queued_requests_only():
    engine = StubEngine(delay_s=0.2)

    async def main():
        batcher = await started(DynamicBatcher(engine, max_batch_size=1, max_delay_ms=0))
        tasks = [asyncio.create_task(batcher.run(inputs(1, seed=i))) for i in range(3)]
        await asyncio.sleep(0.05)  # the first is inside the engine, two are queued
        await batcher.stop(drain=False)
        await batcher.stop()  # idempotent
        return await asyncio.gather(*tasks, return_exceptions=True)

    first, *rest = asyncio.run(main())
    assert_outputs(first, expected(inputs(1, seed=0)))  # the running batch completes
    assert all(isinstance(r, BatcherClosedError) for r in rest)
    assert engine.calls == [1]


def test_requests_are_refused_before_start_and_when_malformed():
    batcher = DynamicBatcher(StubEngine())

    async def main():
        with pytest.raises(BatcherClosedError):
            await batcher.run(inputs(1))
        await batcher.start()
        try:
            with pytest.raises(EngineInputError, match="float32"):
                await batcher.run(inputs(1).astype(np.float64))
            with pytest.raises(EngineInputError):
                await batcher.run(np.zeros((1, 3, S + 1, S), np.float32))
            empty = await batcher.run(inputs(0))
            assert {name: rows.shape for name, rows in empty.items()} == {"embedding": (0, D), "style": (0, 2)}
        finally:
            await batcher.stop()

    asyncio.run(main())


def test_the_event_loop_keeps_running_during_inference():
    engine = StubEngine(delay_s=0.3)

    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        async with DynamicBatcher(engine, max_delay_ms=0) as batcher:
            task = asyncio.create_task(ticker())
            await batcher.run(inputs(1))
            task.cancel()
        return ticks

    assert asyncio.run(main()) >= 10  # a blocked loop would tick about once in 0.3 s


def test_metrics_hook_sees_every_batch():
    engine = StubEngine(delay_s=0.02)
    records: list[BatchRecord] = []
    x = inputs(6)
    x[5, 0, 0, 0] = POISON

    def hook(record):
        records.append(record)
        raise RuntimeError("a broken hook is logged, not raised")

    async def main():
        async with DynamicBatcher(engine, max_batch_size=4, max_delay_ms=20, on_batch=hook) as batcher:
            await asyncio.gather(*(batcher.run(x[i : i + 1]) for i in range(6)), return_exceptions=True)
            return batcher.stats

    stats = asyncio.run(main())
    assert [r.size for r in records] == engine.calls == [4, 2]
    assert [r.requests for r in records] == [4, 2]
    assert [r.error for r in records] == [None, "ValueError"]
    assert all(r.inference_s >= 0.02 and all(w >= 0 for w in r.queue_wait_s) for r in records)
    # the second batch queued while the first ran: its wait includes that inference
    assert min(records[1].queue_wait_s) >= records[0].inference_s * 0.9
    assert stats.batches == 2 and stats.faces == 6 and stats.failed_batches == 1 and stats.sizes == {4: 1, 2: 1}
    assert stats.inference_s == pytest.approx(sum(r.inference_s for r in records))


# ---------------------------------------------------------------- the real ONNX engine


@pytest.fixture(scope="module")
def onnx_engine(tiny_model):
    from engines.onnx_runtime import OnnxRuntimeEngine

    return OnnxRuntimeEngine(tiny_model, intra_op_threads=1)


def test_onnx_16_concurrent_requests_match_faces_embedded_alone(onnx_engine):
    x = preprocess(faces(16), onnx_engine.card)
    alone = np.concatenate([onnx_engine.embed(x[i : i + 1]) for i in range(16)])  # (16, D), no batcher
    records = []

    async def main():
        async with DynamicBatcher(onnx_engine, max_batch_size=16, max_delay_ms=50, on_batch=records.append) as b:
            return await asyncio.gather(*(b.run(x[i : i + 1]) for i in range(16)))

    batched = np.concatenate([out["embedding"] for out in asyncio.run(main())])
    assert [r.size for r in records] == [16]  # one inference for the 16 faces
    # batch invariance: each face inside the batch agrees with itself alone, and not with its neighbours
    assert cosines(batched, alone).min() >= 1 - 1e-4
    assert cosines(batched, np.roll(alone, 1, axis=0)).max() < 0.99
    np.testing.assert_allclose(np.linalg.norm(batched, axis=1), np.linalg.norm(alone, axis=1), rtol=1e-4)
