"""The service's one settings class: every field reads from a `FACESET_*` environment variable.

    FACESET_MODEL_CARD=models/default FACESET_API_KEYS='["k1","k2"]' faceset serve

Each field's description says what it trades off. Outside development (`FACESET_ENVIRONMENT`
other than "development") the service refuses to start without API keys.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Literal, get_args

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

MODELS = Path(files("faceset_models"))  # the committed models: models/ in a checkout, in site-packages when installed
ServingRuntime = Literal["onnxruntime", "tensorrt"]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FACESET_", extra="ignore", frozen=True)

    environment: Literal["development", "production"] = Field(
        default="development",
        description="'production' refuses to start without FACESET_API_KEYS.")
    model_card: Path = Field(
        default=MODELS / "default",
        description="Recognition model: a card.yaml or the folder holding one (ONNX + card).")
    fusion_card: Path | None = Field(
        default=MODELS / "caface",
        description="CAFace fusion model (two ONNX + card) for /templates and gallery enrolment from several photos; "
                    "'none' turns them off (templates answer 503 saying so; the gallery fuses photos by their mean). "
                    "Where absent, likewise. It must have been trained on the served model (faceset model fuse).")
    template_min_quality: float = Field(
        default=0.0, ge=0, le=1,
        description="Quality floor of a template frame when the request sets none; frames below it are reported "
                    "as rejected (CAFace already down-weights poor frames; a floor keeps junk out entirely). Not "
                    "applied for a model whose card has no validated quality.")
    template_id_window: int = Field(
        default=4096, ge=0,
        description="Most recent frame ids a template remembers to refuse retried frames (Redis memory per "
                    "template grows with it, never with the frame count); 0 keeps them all.")
    detector_dir: Path = Field(
        default=MODELS / "detector",
        description="Face detector (MTCNN ONNX + card) folder.")
    engine: ServingRuntime = Field(
        default="onnxruntime",
        description="Runtime for the recognition model: onnxruntime (CPU, CUDA where present) or tensorrt. "
                    "torch is not served: it would load torch and the training package.")
    engine_threads: int = Field(
        default=0, ge=0,
        description="Threads per recognition inference; 0 = every core. Lower leaves cores for detection.")
    detector_threads: int = Field(
        default=1, ge=1,
        description="Threads per detector inference; detections of concurrent requests run side by side.")
    max_batch_size: int = Field(
        default=16, ge=1, le=1024,
        description="Most faces per recognition inference. Larger: more throughput, more latency per batch. "
                    "Set near the expected number of concurrent faces.")
    max_queue_delay_ms: float = Field(
        default=2.0, ge=0, le=1000,
        description="How long a lone face waits for others to share its batch (added latency at low load).")
    max_body_bytes: int = Field(
        default=20 * 1024 * 1024, ge=1024,
        description="Largest request body; larger requests get 413 before they are read whole.")
    max_image_pixels: int = Field(
        default=40_000_000, ge=1,
        description="Largest decoded image (width × height); larger ones, decompression bombs included, get 422.")
    max_images: int = Field(
        default=32, ge=1,
        description="Most images in one request (413 beyond).")
    detect_max_side: int = Field(
        default=1280, ge=64,
        description="Photos with a longer side above this are detected on a copy shrunk to it (detection time "
                    "grows with pixels), then aligned at full resolution. Larger finds smaller faces in big photos.")
    max_faces: int = Field(
        default=16, ge=1,
        description="Most faces returned per image when the request sets no max_faces.")
    min_face_size: float = Field(
        default=20.0, ge=0,
        description="Smallest face (shorter box side, px) returned when the request sets no min_face_size.")
    default_far: float = Field(
        default=1e-3, gt=0, lt=1,
        description="False accept rate whose calibrated threshold /verify uses when the request names none "
                    "(and /gallery/search, with a model card that has no FPIR calibration).")
    default_fpir: float = Field(
        default=1e-2, gt=0, lt=1,
        description="False positive identification rate of /gallery/search when the request names neither fpir "
                    "nor far: the share of people not enrolled identified as someone. Lower: fewer strangers "
                    "let in, more enrolled people not recognised. Must lie in the model card's calibrated range.")
    api_keys: list[SecretStr] = Field(
        default_factory=list,
        description="Accepted X-API-Key values (JSON list). Empty: no authentication (development only).")
    redis_url: SecretStr | None = Field(
        default=None,
        description="Redis for templates and gallery, e.g. redis://host:6379/0. Unset: the service starts "
                    "an embedded redis-server with its data in state_dir.")
    key_prefix: str = Field(
        default="faceset:",
        description="Prefix of every Redis key this service writes (several deployments can share a Redis).")
    state_dir: Path = Field(
        default_factory=lambda: Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "faceset",
        description="Where the service keeps local state: the embedded Redis's files, TensorRT plans. Default "
                    "$XDG_STATE_HOME/faceset (~/.local/state/faceset): the user's, whatever the working directory.")
    max_concurrent_requests: int = Field(
        default=16, ge=1,
        description="Face requests served at once; more get 429 at once instead of queueing without bound. The "
                    "slots bound how long an admitted request waits (about slots / throughput: 16 at ~30 one-face "
                    "requests/s on 2 vCPUs is ~0.5 s; 64 let accepted requests wait ~10 s at twice the sustainable "
                    "rate, benchmarks/load.py). Raise it with the cores.")
    body_timeout_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="Deadline for receiving a request's body (408 beyond); the body is read before the request "
                    "counts against max_concurrent_requests. Longer serves slower uploads (20 MiB at 4 Mbit/s "
                    "takes 40 s); shorter frees a slow client's connection and buffer sooner.")
    keep_alive_s: float = Field(
        default=75.0, gt=0, le=3600,
        description="How long an idle keep-alive connection stays open between requests. Keep it longer than "
                    "the idle timeout of the clients and load balancers in front (e.g. 60 s), or a request they "
                    "send on a connection the service is closing is reset (a 502 at the balancer); shorter frees "
                    "idle connections sooner.")
    header_timeout_s: float = Field(
        default=10.0, gt=0, le=600,
        description="Deadline for a request's headers, from the connection, or from the end of the keep-alive "
                    "allowance after the previous response; the "
                    "connection is closed beyond it. Shorter drops slow-header clients (Slowloris) sooner.")
    self_test_interval_s: float = Field(
        default=10.0, gt=0, le=3600,
        description="Seconds between the background self-tests (one real inference each) that /readyz reports; "
                    "after a failure it reruns within 1 s. Shorter: a broken engine is seen sooner, at the cost "
                    "of an inference per interval.")
    readiness_redis_ttl_s: float = Field(
        default=1.0, ge=0, le=60,
        description="Seconds /readyz reuses its last Redis PING. Longer: fewer PINGs however often /readyz is "
                    "called, but Redis going or coming back is seen that much later.")
    erasure_interval_s: float = Field(
        default=60.0, gt=0, le=3600,
        description="Bound on how long deleted identities and templates linger: after deletions Redis's files are "
                    "rewritten at most once per interval (a burst of deletions costs one rewrite), and every replica "
                    "brings its gallery indexes up to Redis at least this often. Shorter: erasure completes sooner, "
                    "at the cost of more rewrites (each writes the whole data set to disk).")
    gallery_exact_max: int = Field(
        default=100_000, ge=0,
        description="Largest gallery searched exactly (a scan of every vector). Above it an approximate index is "
                    "built in the background and its shortlist re-scored exactly: faster searches, a rare missed "
                    "neighbour (benchmarks/RESULTS.md). Higher: exact answers further up, slower searches there.")
    gallery_probe: float = Field(
        default=0.25, gt=0, le=1,
        description="Share of the approximate index's lists each search scans. Lower: faster searches, more "
                    "missed neighbours. 0.25 keeps recall@10 at 0.975 on vectors distributed like real embeddings "
                    "(11.9x the exact scan's rate at 1,000,000); random unit vectors, with no structure, need 1.")
    gallery_device: Literal["cpu", "gpu"] = Field(
        default="cpu",
        description="Where gallery searches run: gpu (faiss-gpu, the GPU install: README, GPU) searches on GPU 0, "
                    "with one copy of the approximate index there re-uploaded after each batch of changes; the "
                    "service refuses to start where faiss-gpu or the GPU is missing. cpu: faiss-cpu.")
    gallery_calibration_min: int = Field(
        default=200, ge=0,
        description="Smallest gallery whose FPIR thresholds come from its own identities (the card's tail moved to "
                    "the gallery's all-vs-all cosines, kept in Redis so every replica decides alike, refitted when the "
                    "gallery has grown or shrunk by a tenth): FPIR then holds for the site's photos rather than the "
                    "calibration hold-out's (benchmarks/RESULTS.md). 0: always the card's. Lower: earlier, noisier.")
    gallery_snapshot_min: int = Field(
        default=10_000, ge=0,
        description="Smallest gallery whose index a replica keeps a snapshot of in state_dir, so a cold replica "
                    "loads it in seconds instead of reading every vector from Redis. Lower: more files on disk.")
    gallery_snapshot_interval_s: float = Field(
        default=600.0, ge=0,
        description="Seconds between rewrites of a changed gallery's snapshot (0: no snapshots). Deletions rewrite "
                    "it within erasure_interval_s whatever this says. Shorter: less log to catch up at a cold "
                    "start, more disk writes (the whole index each time).")
    log_level: Literal["debug", "info", "warning", "error"] = Field(default="info", description="Log level.")

    @field_validator("engine", mode="before")
    @classmethod
    def _serving_runtime(cls, value: object) -> object:
        if value not in get_args(ServingRuntime):  # pydantic's own message names the field, not the variable
            raise ValueError(f"FACESET_ENGINE must be one of {', '.join(get_args(ServingRuntime))}, not {value!r}")
        return value

    @field_validator("fusion_card", mode="before")
    @classmethod
    def _none(cls, value: object) -> object:
        return None if isinstance(value, str) and value.strip().lower() == "none" else value

    @field_validator("model_card", "detector_dir")
    @classmethod
    def _exists(cls, value: Path) -> Path:
        if not value.exists():
            raise ValueError(f"{value} does not exist")
        return value

    @model_validator(mode="after")
    def _secure(self) -> Settings:
        if self.environment != "development" and not self.api_keys:
            raise ValueError("FACESET_API_KEYS must be set when FACESET_ENVIRONMENT is not 'development'")
        if any(not k.get_secret_value() for k in self.api_keys):
            raise ValueError("FACESET_API_KEYS must not contain an empty key")
        return self

    @property
    def log_level_number(self) -> int:
        return getattr(logging, self.log_level.upper())


@lru_cache
def get_settings() -> Settings:
    return Settings()
