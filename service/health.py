"""Readiness: every part the service needs answers a real request, each within a deadline."""
from __future__ import annotations

import asyncio

from service.redis_store import ping
from service.schemas import Check, Readiness

TIMEOUT_S = 5.0


async def _check(coro) -> Check:
    try:
        return Check(ok=True, detail=await asyncio.wait_for(coro, TIMEOUT_S))
    except asyncio.TimeoutError:
        return Check(ok=False, detail=f"no answer within {TIMEOUT_S:g} s")
    except Exception as exc:  # noqa: BLE001 - any failure of a dependency means "not ready", with its reason
        return Check(ok=False, detail=f"{type(exc).__name__}: {exc}"[:300])


async def readiness(state) -> Readiness:
    model, redis = await asyncio.gather(_check(state.faces.self_test()), _check(ping(state.redis)))
    checks = {"model": model, "redis": redis}
    return Readiness(ready=all(c.ok for c in checks.values()), checks=checks)
