"""The TensorRT engine. Its pure parts run anywhere; building and running a plan needs `tensorrt`,
`cuda-python` and an NVIDIA GPU, and those tests skip with the reason otherwise."""
from __future__ import annotations

import hashlib
import importlib
import threading

import numpy as np
import pytest

from engines.base import ENGINES, RUNTIME_MODULES
from engines.tensorrt_engine import (
    PLAN_SUFFIX,
    TensorRTError,
    ThreadDevice,
    buffer_nbytes,
    cached_plan,
    input_max_shape,
    onnx_input_name,
    parse_onnx,
    plan_cache_key,
    profile_shapes,
)
from tests.helpers import DEFAULT_CARD, cosines, faces, gpu_skip_reason

KEY_ARGS = dict(onnx_sha256="a" * 64, gpu_name="NVIDIA H100 80GB HBM3", trt_version="10.7.0",
                max_batch_size=64, fp16=True)


def test_cache_key_is_sha256_of_every_field():
    fields = "onnx=" + "a" * 64 + "\ngpu=NVIDIA H100 80GB HBM3\ntensorrt=10.7.0\nmax_batch=64\nfp16=True"
    assert plan_cache_key(**KEY_ARGS) == hashlib.sha256(fields.encode()).hexdigest()


@pytest.mark.parametrize("field,other", [("onnx_sha256", "b" * 64), ("gpu_name", "NVIDIA A10"),
                                         ("trt_version", "10.8.0"), ("max_batch_size", 32), ("fp16", False)])
def test_cache_key_changes_with_each_field(field, other):
    assert plan_cache_key(**{**KEY_ARGS, field: other}) != plan_cache_key(**KEY_ARGS)


@pytest.mark.parametrize("max_batch,opt", [(64, 32), (7, 3), (2, 1), (1, 1)])
def test_profile_shapes_span_one_to_max_batch(max_batch, opt):
    low, mid, high = profile_shapes(max_batch, 112)
    assert low == (1, 3, 112, 112) and mid == (opt, 3, 112, 112) and high == (max_batch, 3, 112, 112)
    with pytest.raises(ValueError):
        profile_shapes(0, 112)


def test_plan_cache_builds_once_and_stores_atomically(tmp_path):
    builds = []

    def build():
        builds.append(1)
        return b"plan-bytes"

    plan, path, built = cached_plan(tmp_path / "cache", "k1", build)
    assert (plan, built) == (b"plan-bytes", True) and path == tmp_path / "cache" / f"k1{PLAN_SUFFIX}"
    assert path.read_bytes() == b"plan-bytes"
    again, same_path, built_again = cached_plan(tmp_path / "cache", "k1", build)
    assert (again, same_path, built_again) == (b"plan-bytes", path, False) and len(builds) == 1
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temp file left beside it


def test_a_failed_build_stores_nothing(tmp_path):
    def failing():
        raise TensorRTError("parse error")

    with pytest.raises(TensorRTError):
        cached_plan(tmp_path, "k2", failing)
    with pytest.raises(TensorRTError, match="empty"):
        cached_plan(tmp_path, "k3", lambda: b"")
    assert list(tmp_path.iterdir()) == []


def _plan_or_none(plan: bytes) -> bytes | None:
    """Stands in for TensorRT's deserialize_cuda_engine, which returns None for a plan it cannot read."""
    return plan if plan.startswith(b"PLAN") else None


@pytest.mark.parametrize("cached", [b"\x00garbage", b""])
def test_a_cached_plan_that_does_not_deserialise_is_rebuilt_and_replaced(tmp_path, cached):
    path = tmp_path / f"k4{PLAN_SUFFIX}"
    path.write_bytes(cached)  # corrupt (or truncated by something other than our atomic write)
    plan, same, built = cached_plan(tmp_path, "k4", lambda: b"PLAN-new", _plan_or_none)
    assert (plan, same, built) == (b"PLAN-new", path, True) and path.read_bytes() == b"PLAN-new"
    again = cached_plan(tmp_path, "k4", lambda: pytest.fail("rebuilt a good plan"), _plan_or_none)
    assert again == (b"PLAN-new", path, False)


def test_a_plan_of_another_tensorrt_is_rebuilt(tmp_path):
    """A loader that raises TensorRTError (a version mismatch reported as an error) also means: rebuild."""
    def load(plan: bytes) -> bytes:
        if plan != b"PLAN-10":
            raise TensorRTError("serialised by another TensorRT")
        return plan

    (tmp_path / f"k5{PLAN_SUFFIX}").write_bytes(b"PLAN-11")
    assert cached_plan(tmp_path, "k5", lambda: b"PLAN-10", load)[1:] == (tmp_path / f"k5{PLAN_SUFFIX}", True)


def test_a_fresh_plan_that_does_not_deserialise_is_not_stored(tmp_path):
    with pytest.raises(TensorRTError, match="freshly built"):
        cached_plan(tmp_path, "k6", lambda: b"junk", _plan_or_none)
    assert list(tmp_path.iterdir()) == []


def test_buffers_are_sized_from_the_profiles_max_shape_not_the_batch():
    """A brought-in ONNX with dynamic height and width: every -1 takes the profile's max, so the input buffer
    holds 64 faces of 112×112 (the old sizing put the max batch, 64, in every dynamic dimension: 64×64)."""
    profile = profile_shapes(64, 112)
    high = input_max_shape((-1, 3, -1, -1), profile)
    assert high == (64, 3, 112, 112)
    assert buffer_nbytes(high, 4) == 64 * 3 * 112 * 112 * 4
    assert input_max_shape((-1, 3, 112, 112), profile) == high  # the usual dynamic-batch graph
    with pytest.raises(TensorRTError):
        input_max_shape((-1, 3, 96, 96), profile)  # a fixed size the profile contradicts
    with pytest.raises(TensorRTError):
        input_max_shape((-1, 3, 112), profile)
    with pytest.raises(TensorRTError, match="dynamic"):
        buffer_nbytes((64, -1), 4)  # an output whose shape the plan has not inferred


def test_the_device_is_set_on_every_thread_that_runs_inference():
    calls = []
    device = ThreadDevice(lambda d: calls.append((threading.get_ident(), d)), 1)
    device.bind()
    device.bind()  # once per thread
    worker = threading.Thread(target=lambda: (device.bind(), device.bind()))
    worker.start()
    worker.join()
    assert [d for _, d in calls] == [1, 1] and calls[0][0] == threading.get_ident() and calls[1][0] != calls[0][0]


def test_an_onnx_with_external_weights_is_parsed_from_its_path(tmp_path):
    """The weights live in model.onnx.data beside the graph: the input name is read without them, and the
    parser is handed the path (TensorRT's parse_from_file finds external data relative to it)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((8, 4)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [weight])
    path = tmp_path / "model.onnx"
    onnx.save(helper.make_model(graph), str(path), save_as_external_data=True, location="model.onnx.data",
              size_threshold=0)
    assert (tmp_path / "model.onnx.data").is_file() and onnx_input_name(path) == "x"

    class Parser:  # what TensorRT's parser needs from us: the path; it resolves the weights beside it
        num_errors = 0

        def parse_from_file(self, model: str) -> bool:
            loaded = onnx.load(model)
            return numpy_helper.to_array(loaded.graph.initializer[0]).shape == (8, 4)

    parse_onnx(Parser(), path)


def test_runtime_is_registered():
    """build_engine("tensorrt") reaches TensorRTEngine: the module it names registers that class under the name."""
    from engines.tensorrt_engine import TensorRTEngine

    importlib.import_module(RUNTIME_MODULES["tensorrt"])
    assert ENGINES.get("tensorrt") is TensorRTEngine


# ---------------------------------------------------------------- on a GPU


@pytest.fixture(scope="module")
def gpu():
    reason = gpu_skip_reason()
    if reason:
        pytest.skip(reason)


@pytest.mark.gpu
def test_fp16_plan_matches_onnx_runtime_and_is_cached(gpu, tiny_model, tmp_path):
    from engines.base import embed_aligned
    from engines.onnx_runtime import OnnxRuntimeEngine
    from engines.tensorrt_engine import TensorRTEngine

    trt_engine = TensorRTEngine(tiny_model, max_batch_size=8, cache_dir=tmp_path)
    reference = OnnxRuntimeEngine(tiny_model, providers=["CPUExecutionProvider"], intra_op_threads=1)
    crops = faces(11, seed=5)  # 11 > 8: two chunks, the second a partial batch
    a = embed_aligned(trt_engine, trt_engine.card, crops)
    b = embed_aligned(reference, reference.card, crops)
    assert cosines(a, b).min() >= 0.999
    assert trt_engine.health()
    plans = list(tmp_path.glob(f"*{PLAN_SUFFIX}"))
    assert [p.stem for p in plans] == [trt_engine.cache_key]
    stamp = plans[0].stat().st_mtime_ns
    again = TensorRTEngine(tiny_model, max_batch_size=8, cache_dir=tmp_path)  # from the cache, not rebuilt
    assert plans[0].stat().st_mtime_ns == stamp
    np.testing.assert_allclose(embed_aligned(again, again.card, crops), a, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_fp16_plan_returns_the_style_output_like_onnx_runtime(gpu, tmp_path):
    """The default model's CAFace style statistics from the TensorRT plan (FP16) against ONNX Runtime (FP32)."""
    from engines.base import preprocess
    from engines.model_card import ModelCard
    from engines.onnx_runtime import OnnxRuntimeEngine
    from engines.tensorrt_engine import TensorRTEngine

    card = ModelCard.load(DEFAULT_CARD)
    if card.outputs.style is None:
        pytest.skip("the default model has no style output")
    trt_engine = TensorRTEngine(card, max_batch_size=8, cache_dir=tmp_path)
    reference = OnnxRuntimeEngine(card, providers=["CPUExecutionProvider"], intra_op_threads=1)
    x = preprocess(np.random.default_rng(3).integers(0, 256, (11, card.input.size, card.input.size, 3), np.uint8), card)
    a, b = trt_engine.run(x), reference.run(x)
    assert trt_engine.outputs == reference.outputs and a["style"].shape == (11, 2 * sum(card.outputs.style_channels))
    assert cosines(a["embedding"], b["embedding"]).min() >= 0.999 and cosines(a["style"], b["style"]).min() >= 0.999


@pytest.mark.gpu
def test_a_plan_built_on_one_thread_runs_on_another(gpu, tiny_model, tmp_path):
    """The batcher's thread is not the one that built the engine: the device is set there too (ThreadDevice)."""
    from concurrent.futures import ThreadPoolExecutor

    from engines.base import embed_aligned
    from engines.tensorrt_engine import TensorRTEngine

    trt_engine = TensorRTEngine(tiny_model, max_batch_size=8, cache_dir=tmp_path)
    crops = faces(5, seed=7)
    here = embed_aligned(trt_engine, trt_engine.card, crops)
    with ThreadPoolExecutor(1) as pool:
        there = pool.submit(embed_aligned, trt_engine, trt_engine.card, crops).result()
    np.testing.assert_allclose(there, here, rtol=1e-3, atol=1e-3)
