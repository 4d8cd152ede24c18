"""Every registered runtime against the one engine contract: the outputs it declares, one row per face, and a
face alone equal to the same face inside a batch, for every output (TensorRT where a GPU is here)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engines.base import RUNTIME_MODULES, Engine, build_engine, preprocess
from tests.helpers import DEFAULT_CARD, gpu_skip_reason


def _onnxruntime(tiny: Path, tmp: Path) -> Engine:
    return build_engine("onnxruntime", card=DEFAULT_CARD, intra_op_threads=1, max_batch_size=4)  # has a style output


def _torch(tiny: Path, tmp: Path) -> Engine:
    pytest.importorskip("torch")
    return build_engine("torch", checkpoint=tiny.parent.parent / "backbone.pt", card=tiny, threads=1, max_batch_size=4)


def _tensorrt(tiny: Path, tmp: Path) -> Engine:
    reason = gpu_skip_reason()
    if reason:
        pytest.skip(reason)
    return build_engine("tensorrt", card=DEFAULT_CARD, max_batch_size=4, cache_dir=tmp)


BUILDERS = {"onnxruntime": _onnxruntime, "torch": _torch, "tensorrt": _tensorrt}


def test_every_registered_runtime_is_checked_here():
    assert set(BUILDERS) == set(RUNTIME_MODULES)


@pytest.fixture(scope="module", params=[pytest.param(name, marks=pytest.mark.gpu) if name == "tensorrt" else name
                                        for name in sorted(BUILDERS)])
def engine(request, tiny_model, tmp_path_factory) -> Engine:
    return BUILDERS[request.param](tiny_model, tmp_path_factory.mktemp(request.param))


def _batch(engine, n: int, seed: int = 2) -> np.ndarray:
    s = engine.input_size
    return preprocess(np.random.default_rng(seed).integers(0, 256, (n, s, s, 3), dtype=np.uint8), engine.card)


def test_run_returns_the_declared_outputs_one_row_per_face(engine):
    assert isinstance(engine, Engine) and engine.outputs["embedding"] == engine.embedding_size
    x = _batch(engine, 6)  # 6 > max_batch_size 4: two chunks, the second partial
    out = engine.run(x)
    assert {name: rows.shape for name, rows in out.items()} == {name: (6, width) for name, width in engine.outputs.items()}
    assert all(rows.dtype == np.float32 and np.isfinite(rows).all() for rows in out.values())
    empty = engine.run(x[:0])
    assert {name: rows.shape for name, rows in empty.items()} == {name: (0, width) for name, width in engine.outputs.items()}
    assert engine.health()


def test_a_face_alone_equals_the_same_face_inside_a_batch(engine):
    x = _batch(engine, 4, seed=7)
    together = engine.run(x)
    for i in (0, 3):
        alone = engine.run(x[i : i + 1])
        for name in engine.outputs:
            np.testing.assert_allclose(alone[name][0], together[name][i], rtol=1e-4, atol=1e-4, err_msg=name)
    # and not with a neighbour: rows belong to their own face
    assert not np.allclose(together["embedding"][0], together["embedding"][1], rtol=1e-2, atol=1e-2)
