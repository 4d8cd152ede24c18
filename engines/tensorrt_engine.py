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
building at once never leave a truncated plan for the next start. A cached plan that does not
deserialise (corrupt, or from a TensorRT the key did not tell apart) is rebuilt, not fatal. The
ONNX is parsed from its path, so weights stored beside it (external data) are found.

Run: device buffers are allocated once with cuda-python (`cudart`), each sized for the largest
shape the plan accepts: inputs at the optimisation profile's max shape, outputs at the shape the
plan infers for that input (a brought-in ONNX may have dynamic dimensions besides the batch).
Each chunk is copied in, run with `execute_async_v3` on the engine's own stream, copied out. One
execution context serves one inference at a time (a lock), as the batcher drives it. The CUDA
device is current per thread, so it is set on each thread that runs inference (the batcher's),
not only the one that built the engine. Every output the card names ("embedding", and "style"
where the model has it) comes back from the same execution.

Requirements: `tensorrt` 10.x (TENSORRT_MAJOR; pyproject's `tensorrt` extra) and `cuda-python`
(TensorRT's wheel does not bring a CUDA runtime binding of its own). Neither is imported until
an engine is built: the pure functions here (cache key, profile and buffer shapes, plan cache,
per-thread device binding) work without them.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from engines.base import ENGINES, ChunkedEngine, graph_outputs
from engines.model_card import ModelCard, ModelCardError, atomic_write_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")

__all__ = ["TensorRTEngine", "ThreadDevice", "buffer_nbytes", "cached_plan", "input_max_shape", "plan_cache_key",
           "profile_shapes"]

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


def cached_plan(cache_dir: str | Path, key: str, build: Callable[[], bytes],
                load: Callable[[bytes], T] = bytes) -> tuple[T, Path, bool]:
    """The plan named `key` in cache_dir, loaded by `load` (default: the bytes), built by `build()` and
    stored atomically when absent or when the cached one does not load (`load` returns None or raises
    TensorRTError: a corrupt file, or a plan of another TensorRT).

    Returns (loaded plan, its path, whether it was built now). A failing build stores nothing.
    """
    path = Path(cache_dir).expanduser() / f"{key}{PLAN_SUFFIX}"
    if path.is_file():
        try:
            loaded = load(path.read_bytes())
        except TensorRTError as exc:
            loaded, why = None, str(exc)
        else:
            why = "it does not deserialise"
        if loaded is not None:
            return loaded, path, False
        log.warning("cached TensorRT plan %s is unusable (%s): rebuilding it", path, why)
    plan = build()
    if not plan:
        raise TensorRTError("the TensorRT builder returned an empty plan")
    loaded = load(bytes(plan))
    if loaded is None:
        raise TensorRTError("a freshly built TensorRT plan does not deserialise")
    atomic_write_bytes(path, bytes(plan))
    return loaded, path, True


def input_max_shape(declared: tuple[int, ...], profile: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
    """The largest shape an input takes: the profile's max, checked against the plan's declared shape
    (-1 where dynamic; a fixed dimension must equal the profile's)."""
    high = tuple(int(d) for d in profile[-1])
    if len(high) != len(declared) or any(d >= 0 and d != h for d, h in zip(declared, high)):
        raise TensorRTError(f"the profile's max shape {high} does not fit the input's shape {tuple(declared)}")
    return high


def buffer_nbytes(shape: tuple[int, ...], itemsize: int) -> int:
    """Bytes of a tensor of `shape`; every dimension must be known by now."""
    if any(int(d) < 0 for d in shape):
        raise TensorRTError(f"shape {tuple(shape)} still has a dynamic dimension: cannot size its buffer")
    return int(np.prod(shape, dtype=np.int64)) * itemsize


class ThreadDevice:
    """Makes a CUDA device current on each thread that calls `bind()`, once per thread: CUDA's current
    device is per host thread, and inference runs on the batcher's thread, not the one that built it."""

    def __init__(self, set_device: Callable[[int], object], device: int) -> None:
        self.set_device, self.device = set_device, device
        self._local = threading.local()

    def bind(self) -> None:
        if getattr(self._local, "bound", False):
            return
        self.set_device(self.device)
        self._local.bound = True


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


def parse_onnx(parser, onnx_path: Path) -> None:
    """Parse from the file, not its bytes: weights stored as external data are found beside the path."""
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TensorRTError(f"{onnx_path}: TensorRT could not parse the ONNX: {errors}")


def onnx_input_name(onnx_path: Path) -> str:
    """The graph's one real input (initialisers excluded), read without loading external weights."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    initialisers = {i.name for i in graph.initializer}
    inputs = [i.name for i in graph.input if i.name not in initialisers]
    if len(inputs) != 1:
        raise ModelCardError(f"{onnx_path}: expected one input, found {inputs}")
    return inputs[0]


def build_plan(onnx_path: Path, input_name: str, max_batch_size: int, size: int, fp16: bool,
               workspace_bytes: int) -> bytes:
    """Parse the ONNX and build a serialised plan with the dynamic-batch profile (minutes on a big model)."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: every network is explicit-batch
    parser = trt.OnnxParser(network, logger)  # kept until the build: the parser owns the weights' memory
    parse_onnx(parser, onnx_path)
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
        self._device = ThreadDevice(lambda d: _check(self._cudart.cudaSetDevice(d)), device)
        self._device.bind()
        self.cache_key = plan_cache_key(card.files.onnx.sha256, gpu_name(device), trt.__version__,
                                        max_batch_size, fp16)
        input_name = onnx_input_name(card.onnx_path)
        self._trt_logger = trt.Logger(trt.Logger.WARNING)  # outlives the runtime that logs to it
        self._trt_runtime = trt.Runtime(self._trt_logger)
        self._engine, self.plan_path, built = cached_plan(
            cache_dir or DEFAULT_CACHE_DIR, self.cache_key,
            lambda: build_plan(card.onnx_path, input_name, max_batch_size, self.input_size, fp16,
                               int(workspace_gib * (1 << 30))),
            self._trt_runtime.deserialize_cuda_engine)  # None for a corrupt or foreign plan: rebuilt
        log.info("%s: %s plan %s", self.name, "built" if built else "cached", self.plan_path)
        self._context = self._engine.create_execution_context()
        self._lock = threading.Lock()
        self._stream = _check(self._cudart.cudaStreamCreate())
        self._buffers: dict[str, tuple[int, np.dtype, tuple[int, ...]]] = {}
        self._allocate(trt)

    def _allocate(self, trt) -> None:
        """Device memory for the largest shape of every input and output tensor of the plan: the input at
        the profile's max shape, then each output at the shape the plan infers from it."""
        engine = self._engine
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        if len(inputs) != 1:
            raise ModelCardError(f"the plan has inputs {inputs}: expected one")
        self._input_name = inputs[0]
        high = input_max_shape(tuple(engine.get_tensor_shape(inputs[0])),
                               tuple(tuple(s) for s in engine.get_tensor_profile_shape(inputs[0], 0)))
        if not self._context.set_input_shape(inputs[0], high):
            raise TensorRTError(f"{self.name}: the plan refuses its own profile's max shape {high}")
        for name in names:  # inputs first: an output's shape is known once the input's is set
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(name)))
            shape = tuple(int(d) for d in self._context.get_tensor_shape(name))
            pointer = _check(self._cudart.cudaMalloc(buffer_nbytes(shape, dtype.itemsize)))
            self._buffers[name] = (pointer, dtype, shape)
            self._context.set_tensor_address(name, pointer)
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
        with self._lock:
            self._device.bind()  # this thread (the batcher's) may not be the one that built the engine
            if not self._context.set_input_shape(self._input_name, x.shape):
                raise TensorRTError(f"{self.name}: input shape {x.shape} is outside the plan's profile")
            outs = [np.empty(tuple(self._context.get_tensor_shape(name)), dtype=self._buffers[name][1])
                    for name in names]  # (n, …) as the plan infers it for this input
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
