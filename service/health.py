"""Readiness without amplification: /readyz reports results, it never runs inference itself.

The model self-test (a real detection and recognition inference) runs in a background task every
`interval_s`, and again `retry_s` after a failure so a recovered engine is seen soon. The Redis
PING is cheap but still bounded: its answer is reused for `redis_ttl_s`, and concurrent callers
share one PING. Every check has a deadline. The model check names where recognition runs, and why on
the CPU where the runtime could use CUDA (a GPU image started without a GPU still serves, and says so).
"""
from __future__ import annotations

import asyncio
import ctypes.util
import logging
import time
from pathlib import Path

from service.redis_store import ping
from service.schemas import Check, Readiness

TIMEOUT_S = 5.0
CUDA = "CUDAExecutionProvider"
log = logging.getLogger(__name__)


def runs_on(engine) -> str:
    """Where the engine runs: its ONNX Runtime providers' device, or the runtime itself (TensorRT: the GPU)."""
    providers = getattr(engine, "providers", None)
    if providers is None:
        return engine.runtime
    if CUDA in providers:
        return "CUDA"
    import onnxruntime as ort  # loaded already by the engine

    return f"the CPU, not CUDA: {cuda_unavailable()}" if CUDA in ort.get_available_providers() else "the CPU"


def cuda_unavailable() -> str:
    """Why a CUDA build of ONNX Runtime fell back to the CPU (it only logs its own error)."""
    if not Path("/dev/nvidiactl").exists():
        return "no NVIDIA GPU visible (no /dev/nvidiactl; e.g. docker run --gpus all)"
    if ctypes.util.find_library("cuda") is None:
        return "no NVIDIA driver library (libcuda) visible"
    return "CUDA did not start on the visible GPU (the start-up log has ONNX Runtime's error)"


async def _check(coro) -> Check:
    try:
        return Check(ok=True, detail=await asyncio.wait_for(coro, TIMEOUT_S))
    except asyncio.TimeoutError:
        return Check(ok=False, detail=f"no answer within {TIMEOUT_S:g} s")
    except Exception as exc:  # noqa: BLE001 - any failure of a dependency means "not ready", with its reason
        return Check(ok=False, detail=f"{type(exc).__name__}: {exc}"[:300])


class HealthMonitor:
    def __init__(self, faces, redis, interval_s: float, redis_ttl_s: float, retry_s: float = 1.0) -> None:
        self.faces, self.redis = faces, redis
        self.interval_s, self.redis_ttl_s, self.retry_s = interval_s, redis_ttl_s, min(retry_s, interval_s)
        self.model = Check(ok=False, detail="self-test not run yet")
        self._redis: tuple[float, Check] | None = None
        self._redis_lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def _placed(self, check: Check) -> Check:
        if not check.ok:
            return check
        return Check(ok=True, detail=f"{check.detail}; runs on {runs_on(self.faces.batcher.engine)}")

    async def self_test(self) -> Check:
        self.model = self._placed(await _check(self.faces.self_test()))
        if not self.model.ok:
            log.warning("self-test failed: %s", self.model.detail)
        return self.model

    def start(self, passed: str) -> None:
        """Schedule the self-test, starting from the one start-up ran (its detail `passed`)."""
        self.model = self._placed(Check(ok=True, detail=passed))
        self._task = asyncio.create_task(self._schedule(), name="faceset-self-test")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _schedule(self) -> None:
        while True:
            await asyncio.sleep(self.interval_s if self.model.ok else self.retry_s)
            await self.self_test()

    async def _redis_check(self) -> Check:
        async with self._redis_lock:  # one PING at a time; callers behind it reuse its answer
            if self._redis is None or time.monotonic() - self._redis[0] >= self.redis_ttl_s:
                self._redis = (time.monotonic(), await _check(ping(self.redis)))
            return self._redis[1]

    async def readiness(self) -> Readiness:
        checks = {"model": self.model, "redis": await self._redis_check()}
        return Readiness(ready=all(c.ok for c in checks.values()), checks=checks)
