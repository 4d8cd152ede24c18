"""GET /healthz (the process answers), GET /readyz (it can serve), GET /metrics (Prometheus)."""
from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

router = APIRouter()


@router.get("/healthz", summary="Liveness: the process is up")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz", summary="Readiness: the last scheduled self-test passed and Redis answers",
            responses={503: {"description": "Not ready; `checks` says which part failed"}})
async def readyz(request: Request) -> JSONResponse:
    report = await request.app.state.health.readiness()
    body = report.model_dump()
    if not report.ready:
        failed = ", ".join(f"{name}: {c.detail}" for name, c in report.checks.items() if not c.ok)
        body["error"] = {"code": "unavailable", "message": f"not ready ({failed})"}
    return JSONResponse(body, status_code=200 if report.ready else 503)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    data = await asyncio.to_thread(generate_latest, request.app.state.metrics.registry)
    return Response(data, media_type=CONTENT_TYPE_LATEST)
