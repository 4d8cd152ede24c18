"""Plain functions shared by test modules; fixtures live in the conftest.py files."""
from __future__ import annotations

import importlib.util
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import redis

from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CARD = REPO / "models" / "default"
EMBEDDING_SIZE = 64  # of the tiny_model fixture (tests/engines/conftest.py)
REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def live_server(settings: Settings) -> Iterator[tuple[str, int]]:
    """The app under a real uvicorn server on a free loopback port, in a thread: yields (base URL, port).
    uvicorn's loggers propagate (log_config=None), so caplog sees them."""
    import uvicorn

    from service.app import create_app
    from service.limits import server_options

    port = free_port()
    config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_config=None, access_log=False,
                            **server_options(settings))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        assert server.started, "the server did not start within 60 s"
        yield f"http://127.0.0.1:{port}", port
    finally:
        server.should_exit = True
        thread.join(30)


def lfw_pairs(data_dir: Path, same: bool, k: int) -> list[tuple[str, int, str, int]]:
    """The first k same (or different) pairs of lfw-dev/pairs.txt as (name_a, i, name_b, j)."""
    rows = [line.split("\t") for line in (data_dir / "lfw-dev" / "pairs.txt").read_text().splitlines()[1:]]
    rows = [r for r in rows if (len(r) == 3) == same][:k]
    return [(r[0], int(r[1]), r[0], int(r[2])) if same else (r[0], int(r[1]), r[2], int(r[3])) for r in rows]


def encode(img, fmt: str, **kw) -> bytes:
    """A PIL image saved in `fmt` (Pillow's save options as keywords)."""
    import io

    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def celeba_people(data_dir: Path, first: int, count: int, photos: int = 8) -> list[list[bytes]]:
    """`photos` photos each of `count` CelebA-299 identities (those with that many), from the `first`-th on."""
    folders = [p for p in sorted((data_dir / "celeba-299").iterdir()) if len(list(p.glob("*.jpg"))) >= photos]
    return [[f.read_bytes() for f in sorted(d.glob("*.jpg"))[:photos]] for d in folders[first:first + count]]


def gallery_header(settings: Settings, name: str) -> dict:
    """The X-Gallery header naming a test gallery under the settings' key prefix."""
    return {"X-Gallery": f"{settings.key_prefix.strip(':')}.{name}"}


def photo(lfw: Path, name: str, n: int = 1) -> bytes:
    return (lfw / f"{name}_{n:04d}.jpg").read_bytes()


def make_settings(**overrides) -> Settings:
    """Settings for a test app: the shared Redis under a key prefix of its own."""
    values = {"redis_url": REDIS_URL, "key_prefix": f"faceset-test-{uuid.uuid4().hex[:8]}:", "engine_threads": 1}
    values.update(overrides)
    return Settings(**values)


def drop_keys(settings: Settings) -> None:
    if settings.redis_url is None:
        return
    client = redis.Redis.from_url(settings.redis_url.get_secret_value())
    keys = list(client.scan_iter(match=f"{settings.key_prefix}*"))
    if keys:
        client.delete(*keys)
    client.close()


def faces(n: int, seed: int = 1) -> np.ndarray:
    """n random aligned 112×112 RGB faces (uint8)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 112, 112, 3), dtype=np.uint8)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of each row of a with the same row of b, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def gpu_skip_reason() -> str | None:
    """Why the TensorRT runtime cannot run here, or None where it can."""
    for module in ("tensorrt", "cuda"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (the TensorRT runtime needs tensorrt 10 and cuda-python)"
    from engines.tensorrt_engine import _cudart

    try:
        err, count = _cudart().cudaGetDeviceCount()
    except Exception as exc:  # a missing driver raises from inside cuda-python's loader
        return f"no CUDA driver: {exc}"
    return None if int(err) == 0 and count > 0 else "no CUDA device"


def anchor_card(anchors: Path, folder: Path, name: str = "mobilefacenet-a") -> Path:
    """`folder` holding ../shared/anchors' MobileFaceNet A imported as `faceset model import` does (a copy of the ONNX
    and its card: 112 px arcface-aligned, BGR, (x − 127.5)/128, as the anchors' README gives). Returns the folder."""
    from engines.model_import import Conventions, card_for_onnx, publish_onnx

    card = card_for_onnx(anchors / f"{name}.onnx", Conventions("BGR", (127.5,) * 3, (128.0,) * 3), name)
    return publish_onnx(card, folder).parent
