"""The TensorRT engine: an FP16 plan built from the card's ONNX, cached on disk, run on an NVIDIA GPU.

    engine = build_engine("tensorrt", card="models/NAME", max_batch_size=64, cache_dir="~/.cache/faceset/trt")

Build: TensorRT 10's ONNX parser into an explicit-batch network (the only kind TensorRT 10 has),
the FP16 builder flag (layers TensorRT finds faster in half precision run in it; inputs and
outputs stay float32), and one optimisation profile over the dynamic batch axis: min 1,
opt max_batch_size/2, max max_batch_size. Building takes minutes, so plans are cached in
cache_dir under a key hashing everything a plan depends on: the ONNX's sha256, the GPU's name,
the TensorRT version, the profile's max batch size and the precision (a plan is specific to
the GPU model and TensorRT version, and to the shapes and flags it was built for). A plan is
written to a temp file, fsynced and moved into place, so a crash mid-write or two servers
building at once never leave a truncated plan for the next start.

Run: device buffers for max_batch_size faces are allocated once with cuda-python (`cudart`);
each chunk is copied in, run with `execute_async_v3` on the engine's own stream, copied out.
One execution context serves one inference at a time (a lock), as the batcher drives it. Every
output the card names ("embedding", and "style" where the model has it) comes back from the same
execution.

Requirements: `tensorrt` 10.x and `cuda-python` (TensorRT's wheel does not bring a CUDA
runtime binding of its own). Neither is imported until an engine is built: the pure functions
here (cache key, profile shapes, plan cache) work without them.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable

import numpy as np

from engines.base import ENGINES, ChunkedEngine, graph_outputs
from engines.model_card import ModelCard, ModelCardError, atomic_write_bytes

log = logging.getLogger(__name__)

__all__ = ["TensorRTEngine", "cached_plan", "plan_cache_key", "profile_shapes"]

TENSORRT_MAJOR = 10  # the API written for (BuilderFlag.FP16 went in 11); pyproject's `tensorrt` extra pins it
DEFAULT_CACHE_DIR = Path("~/.cache/faceset/tensorrt")
PLAN_SUFFIX = ".plan"


class TensorRTError(RuntimeError):
    """TensorRT or CUDA failed: parsing, building, deserialising or running the plan."""


# ---------------------------------------------------------------- pure parts (no TensorRT)


def plan_cache_key(onnx_sha256: str, gpu_name: str, trt_version: str, max_batch_size: int, fp16: bool) -> str:
    """Hex sha256 naming a plan: the same inputs give the same key, any change a different one."""
    fields = [f"onnx={onnx_sha256}", f"gpu={gpu_name}", f"tensorrt={trt_version}",
              f"max_batch={int(max_batch_size)}", f"fp16={bool(fp16)}"]
    return hashlib.sha256("\n".join(fields).encode()).hexdigest()


def profile_shapes(max_batch_size: int, size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) input shapes of the dynamic-batch profile: batches 1, max/2 (at least 1) and max."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
    opt = max(1, max_batch_size // 2)
    return (1, 3, size, size), (opt, 3, size, size), (max_batch_size, 3, size, size)


def cached_plan(cache_dir: str | Path, key: str, build: Callable[[], bytes]) -> tuple[bytes, Path, bool]:
    """The plan named `key` in cache_dir, built by `build()` and stored atomically when absent.

    Returns (plan bytes, its path, whether it was built now). A failing build stores nothing.
    """
    path = Path(cache_dir).expanduser() / f"{key}{PLAN_SUFFIX}"
    if path.is_file():
        return path.read_bytes(), path, False
    plan = build()
    if not plan:
        raise TensorRTError("the TensorRT builder returned an empty plan")
    atomic_write_bytes(path, bytes(plan))
    return bytes(plan), path, True


# ---------------------------------------------------------------- CUDA (cuda-python)


def _cudart():
    try:
        from cuda.bindings import runtime as cudart  # cuda-python ≥ 12.6
    except ImportError:
        from cuda import cudart  # older cuda-python
    return cudart


def _check(result):
    """cuda-python returns (error, *values): raise on an error, else the value(s)."""
    err, *values = result
    if int(err) != 0:
        raise TensorRTError(f"CUDA error {err}")
    return values[0] if len(values) == 1 else (tuple(values) or None)


def gpu_name(device: int = 0) -> str:
    props = _check(_cudart().cudaGetDeviceProperties(device))
    name = props.name
    return name.split(b"\0", 1)[0].decode() if isinstance(name, bytes) else str(name)


# ---------------------------------------------------------------- build


def build_plan(onnx_path: Path, input_name: str, max_batch_size: int, size: int, fp16: bool,
               workspace_bytes: int) -> bytes:
    """Parse the ONNX and build a serialised plan with the dynamic-batch profile (minutes on a big model)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network is explicit-batch
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{onnx_path}: TensorRT could not parse the ONNX: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    profile.set_shape(input_name, *profile_shapes(max_batch_size, size))
    config.add_optimization_profile(profile)
    log.info("building a TensorRT plan for %s (max batch %d, fp16 %s): this takes a while",
             onnx_path.name, max_batch_size, fp16)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TensorRTError(f"{onnx_path}: the TensorRT build failed (see the TensorRT log above)")
    return bytes(plan)


# ---------------------------------------------------------------- the engine


@ENGINES.register("tensorrt")
class TensorRTEngine(ChunkedEngine):
    """A TensorRT plan of the card's ONNX on one GPU.

    card: a ModelCard, a card.yaml or its folder.
    max_batch_size: the profile's largest batch; also what device memory is reserved for.
    fp16: let TensorRT run layers in half precision (the card's parity bound for FP16 is cosine ≥ 0.999).
    cache_dir: where plans are kept (default ~/.cache/faceset/tensorrt).
    device: CUDA device index.
    workspace_gib: the builder's scratch memory limit; more lets it consider more tactics.
    """

    runtime = "tensorrt"

    def __init__(self, card: ModelCard | str | Path, max_batch_size: int = 64, fp16: bool = True,
                 cache_dir: str | Path | None = None, device: int = 0, workspace_gib: float = 4.0,
                 verify: bool = True) -> None:
        import tensorrt as trt

        self._use_card(card, verify)
        card, self.fp16, self.max_batch_size = self.card, fp16, max_batch_size
        self.graph_outputs = graph_outputs(card)
        self._cudart = _cudart()
        _check(self._cudart.cudaSetDevice(device))
        self.cache_key = plan_cache_key(card.files.onnx.sha256, gpu_name(device), trt.__version__,
                                        max_batch_size, fp16)
        input_name = self._onnx_input_name()
        plan, self.plan_path, built = cached_plan(
            cache_dir or DEFAULT_CACHE_DIR, self.cache_key,
            lambda: build_plan(card.onnx_path, input_name, max_batch_size, self.input_size, fp16,
                               int(workspace_gib * (1 << 30))))
        log.info("%s: %s plan %s", self.name, "built" if built else "cached", self.plan_path)
        self._trt_runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self._engine = self._trt_runtime.deserialize_cuda_engine(plan)
        if self._engine is None:
            raise TensorRTError(f"{self.plan_path}: cannot deserialise the plan (delete it to rebuild)")
        self._context = self._engine.create_execution_context()
        self._lock = threading.Lock()
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        self._allocate(trt)

    def _onnx_input_name(self) -> str:
        import onnx

        graph = onnx.load(str(self.card.onnx_path), load_external_data=False).graph
        initialisers = {i.name for i in graph.initializer}
        inputs = [i.name for i in graph.input if i.name not in initialisers]
        if len(inputs) != 1:
            raise ModelCardError(f"{self.card.onnx_path}: expected one input, found {inputs}")
        return inputs[0]

    def _allocate(self, trt) -> None:
        """Device memory for max_batch_size faces, for every input and output tensor of the plan."""
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            shape = tuple(self.max_batch_size if d < 0 else d for d in self._engine.get_tensor_shape(name))
            pointer = _check(self._cudart.cudaMalloc(int(np.prod(shape)) * dtype.itemsize))
            self._buffers[name] = (pointer, dtype, shape)
            self._context.set_tensor_address(name, pointer)
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self._input_name = name
        missing = [name for name in self.graph_outputs.values() if name not in self._buffers]
        if missing:
            raise ModelCardError(f"the plan has no output {missing}: {sorted(self._buffers)}")

    def _infer(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        """One execution of the plan on (n, 3, S, S); every declared output copied back, float32."""
        cudart, n = self._cudart, len(chunk)
        host_to_device = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice
        device_to_host = cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        in_pointer, in_dtype, _ = self._buffers[self._input_name]
        x = np.ascontiguousarray(chunk, dtype=in_dtype)
        names = list(self.graph_outputs.values())
        outs = [np.empty((n, *self._buffers[name][2][1:]), dtype=self._buffers[name][1]) for name in names]  # (n, …)
        with self._lock:
            if not self._context.set_input_shape(self._input_name, x.shape):
                raise TensorRTError(f"{self.name}: input shape {x.shape} is outside the plan's profile")
            _check(cudart.cudaMemcpyAsync(in_pointer, x.ctypes.data, x.nbytes, host_to_device, self._stream))
            if not self._context.execute_async_v3(int(self._stream)):
                raise TensorRTError(f"{self.name}: execute_async_v3 failed")
            for name, out in zip(names, outs):
                pointer = self._buffers[name][0]
                _check(cudart.cudaMemcpyAsync(out.ctypes.data, pointer, out.nbytes, device_to_host, self._stream))
            _check(cudart.cudaStreamSynchronize(self._stream))
        return {name: out.astype(np.float32, copy=False) for name, out in zip(self.graph_outputs, outs)}

    def close(self) -> None:
        """Free the device memory and the stream (also done when the engine is garbage-collected)."""
        buffers, self._buffers = getattr(self, "_buffers", {}), {}
        for pointer, _, _ in buffers.values():
            self._cudart.cudaFree(pointer)
        if getattr(self, "_stream", None) is not None:
            self._cudart.cudaStreamDestroy(self._stream)
            self._stream = None

    def __del__(self) -> None:
        self.close()
