"""Prometheus metrics: one registry per app (tests build many apps), served at GET /metrics.

Every label comes from a fixed set, so no client can grow the registry: requests are labelled
by route template (`/templates/{id}/frames`, never the id), unmatched paths share the label
"unmatched", and methods outside the standard ones share "other".
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engines.batcher import BatchRecord

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
QUALITY_BUCKETS = tuple(i / 10 for i in range(1, 11))
METHODS = frozenset({"GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"})


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter("faceset_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("faceset_request_duration_seconds", "HTTP request latency by route",
                                 ["route", "method"], buckets=LATENCY_BUCKETS, registry=r)
        self.in_flight = Gauge("faceset_requests_in_flight", "Requests being served", registry=r)
        self.errors = Counter("faceset_errors", "Error responses by error code", ["code"], registry=r)
        self.images = Counter("faceset_images", "Images received, by outcome", ["outcome"], registry=r)
        self.faces = Counter("faceset_faces_embedded", "Faces embedded", registry=r)
        self.quality = Histogram("faceset_face_quality", "MagFace quality of embedded faces",
                                 buckets=QUALITY_BUCKETS, registry=r)
        self.batch_size = Histogram("faceset_batch_size", "Faces per recognition inference",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.queue_wait = Histogram("faceset_batch_queue_wait_seconds", "Wait from queueing to the batch's start",
                                    buckets=LATENCY_BUCKETS, registry=r)
        self.inference = Histogram("faceset_inference_seconds", "Recognition inference time per batch",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.detection = Histogram("faceset_detection_seconds", "Face detection time per image",
                                   buckets=LATENCY_BUCKETS, registry=r)
        self.batch_errors = Counter("faceset_batch_errors", "Failed recognition inferences", ["error"], registry=r)
        self.frames = Counter("faceset_template_frames", "Template frames by outcome (accepted or the rejection reason)",
                              ["outcome"], registry=r)
        self.model = Info("faceset_model", "The recognition model being served", registry=r)

    def on_batch(self, record: BatchRecord) -> None:
        """The dynamic batcher's hook: one call per inference."""
        self.batch_size.observe(record.size)
        self.inference.observe(record.inference_s)
        for wait in record.queue_wait_s:
            self.queue_wait.observe(wait)
        if record.error:
            self.batch_errors.labels(record.error).inc()

    def observe_faces(self, qualities) -> None:
        for q in qualities:
            self.faces.inc()
            if q is not None:
                self.quality.observe(q)


class MetricsMiddleware:
    """Counts and times every HTTP request (pure ASGI: streaming bodies pass through untouched)."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            method = method if method in METHODS else "other"
            self.metrics.requests.labels(label, method, str(status)).inc()
            self.metrics.latency.labels(label, method).observe(time.perf_counter() - started)
