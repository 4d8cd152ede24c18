"""The FastAPI application: `create_app(settings)`; `uvicorn service.app:app` or `faceset serve` runs it.

Start-up loads the model card, the detector and the recognition engine, starts the dynamic
batcher, connects to Redis (or starts the embedded one) and runs the readiness self-test once,
so a broken model fails the start, not the first request; /readyz then reports the same test rerun
on a schedule. The process never imports torch.
"""
from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from engines.base import build_engine
from engines.batcher import DynamicBatcher
from engines.detection import build_detector
from engines.fusion import FusionModel
from engines.model_card import ModelCard
from engines.pipeline import FacePipeline
from service import errors
from service.faces import FaceService
from service.gallery import GalleryService, IndexOptions
from service.gallery_store import GalleryStore
from service.health import HealthMonitor
from service.limits import RequestBody
from service.metrics import Metrics, MetricsMiddleware
from service.redis_store import EmbeddedRedis, FileEraser, connect
from service.routes import console, docs, openapi
from service.routes import faces as face_routes
from service.routes import gallery as gallery_routes
from service.routes import health as health_routes
from service.routes import model as model_routes
from service.routes import templates as template_routes
from service.settings import Settings, get_settings
from service.template_store import TemplateStore
from service.templates import TemplateService, model_id

log = logging.getLogger("faceset")

# what each runtime takes from the settings beyond the card and the batch size
RUNTIME_OPTIONS = {
    "onnxruntime": lambda s: {"intra_op_threads": s.engine_threads, "spin_wait": False},
    "tensorrt": lambda s: {"cache_dir": s.state_dir / "tensorrt"},
}


def build_pipeline(settings: Settings) -> FacePipeline:
    card = ModelCard.load(settings.model_card)
    options = RUNTIME_OPTIONS[settings.engine](settings)
    engine = build_engine(settings.engine, card=card, max_batch_size=settings.max_batch_size, **options)
    detector = build_detector("mtcnn", model_dir=settings.detector_dir, intra_op_threads=settings.detector_threads)
    return FacePipeline(detector, engine, card, detect_max_side=settings.detect_max_side)


def build_templates(settings: Settings, state) -> tuple[TemplateService | None, str | None]:
    """The template service, or None and why (fusion off by setting, no fusion model, or a recognition model
    without style output; both served runtimes return every output the card declares)."""
    card = state.faces.card
    if settings.fusion_card is None:
        return None, "fusion is off by setting (FACESET_FUSION_CARD=none)"
    if not (settings.fusion_card / "card.yaml").exists() and settings.fusion_card.suffix != ".yaml":
        return None, f"no fusion model at {settings.fusion_card} (FACESET_FUSION_CARD)"
    if card.outputs.style is None:
        return None, f"model {card.name} {card.version} has no CAFace style output"
    fusion = FusionModel.load(settings.fusion_card)
    store = TemplateStore(state.redis, settings.key_prefix, fusion.memory_size, model_id(fusion),
                          settings.template_id_window, on_erase=state.eraser.erased)
    try:
        return TemplateService(state.faces, fusion, store, state.metrics, settings.min_face_size), None
    except ValueError as exc:  # the fusion model was trained on another recognition model
        return None, str(exc)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings: Settings = app.state.settings
    state = app.state
    pipeline = await run_in_threadpool(build_pipeline, settings)
    state.batcher = DynamicBatcher(pipeline.engine, settings.max_batch_size, settings.max_queue_delay_ms,
                                   on_batch=state.metrics.on_batch)
    await state.batcher.start()
    state.embedded_redis = None
    url = settings.redis_url.get_secret_value() if settings.redis_url else None
    if url is None:
        state.embedded_redis = EmbeddedRedis(settings.state_dir)
        url = await run_in_threadpool(state.embedded_redis.start)
    state.redis = connect(url)
    state.eraser = FileEraser(state.redis, settings.key_prefix, settings.erasure_interval_s)
    state.faces = FaceService(pipeline, state.batcher, state.metrics, settings.max_image_pixels)
    state.templates, state.templates_off = build_templates(settings, state)
    galleries = GalleryStore(state.redis, settings.key_prefix, pipeline.card.embedding_size, on_erase=state.eraser.erased)
    state.gallery = GalleryService(state.faces, galleries, state.templates, IndexOptions.from_settings(settings))
    card = pipeline.card
    state.metrics.model.info({"name": card.name, "version": card.version, "engine": pipeline.engine.name})
    state.health = HealthMonitor(state.faces, state.redis, settings.self_test_interval_s,
                                 settings.readiness_redis_ttl_s)
    state.eraser.start()
    follower = asyncio.create_task(state.gallery.follow(settings.erasure_interval_s))
    try:
        passed = await state.faces.self_test()  # raises: a broken model fails the start
        log.info("self-test: %s", passed)
        state.health.start(passed)
        log.info("serving %s %s on %s", card.name, card.version, pipeline.engine.name)
        yield
    finally:
        follower.cancel()
        state.gallery.close()
        await state.eraser.stop()
        await state.health.stop()
        await state.batcher.stop()
        await state.redis.aclose()
        if state.embedded_redis is not None:
            await run_in_threadpool(state.embedded_redis.stop)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    logging.getLogger("faceset").setLevel(settings.log_level_number)
    app = FastAPI(title="faceset", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Face detection, embedding, verification and CAFace templates.")
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.state.active_requests = 0
    errors.install(app)
    app.include_router(health_routes.router)
    app.include_router(model_routes.router)
    app.include_router(face_routes.router)
    app.include_router(template_routes.router)
    app.include_router(gallery_routes.router)
    openapi.install(app)
    docs.install(app)
    console.install(app)
    app.add_middleware(RequestBody, max_bytes=settings.max_body_bytes, timeout_s=settings.body_timeout_s)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)  # outermost: sees every status
    return app


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("faceset")
    except PackageNotFoundError:
        return "0.0.0"


def __getattr__(name: str):
    # `uvicorn service.app:app`: built on first access, so importing this module has no side effects
    if name == "app":
        return create_app()
    raise AttributeError(name)


__all__ = ["build_pipeline", "create_app"]
