"""/readyz names the device recognition runs on; a CUDA build that fell back to the CPU says why.

The fallback itself (the GPU image started without a GPU) is run by docker/gpu-image-check.sh.
"""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from service.health import CUDA, cuda_unavailable, runs_on


def test_readyz_names_the_device_the_recognition_model_runs_on(client):
    engine = client.app.state.batcher.engine
    detail = client.get("/readyz").json()["checks"]["model"]["detail"]
    assert detail.endswith(f"; runs on {runs_on(engine)}")
    if CUDA in engine.providers:
        assert runs_on(engine) == "CUDA"
    elif CUDA not in ort.get_available_providers():  # a CPU build: nothing to explain
        assert runs_on(engine) == "the CPU"
    else:
        assert runs_on(engine).startswith("the CPU, not CUDA: ")


def test_the_fallback_reason_names_what_is_missing():
    reason = cuda_unavailable()
    if not Path("/dev/nvidiactl").exists():
        assert reason.startswith("no NVIDIA GPU visible")
    else:
        assert "libcuda" in reason or "did not start" in reason
