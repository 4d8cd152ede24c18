from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from engines.base import ENGINES, Engine, EngineInputError, build_engine, embed_aligned, merge_tta, preprocess, run_aligned
from engines.model_card import ModelCard, ModelCardError, sha256_file
from engines.onnx_runtime import OnnxRuntimeEngine, default_providers
from tests.helpers import DEFAULT_CARD, EMBEDDING_SIZE, REPO, faces


def hand_card(size: int, order: str, mean, std) -> ModelCard:
    return ModelCard.model_validate({
        "name": "hand", "version": "1", "architecture": "none",
        "files": {"onnx": {"path": "x.onnx", "sha256": "0" * 64}},
        "input": {"size": size, "template": "arcface_112", "channel_order": order, "mean": mean, "std": std},
        "embedding_size": 4, "licence": "test", "provenance": {"source": "test"},
    })


# ---------------------------------------------------------------- preprocess (no model)


@pytest.mark.parametrize("order", ["RGB", "BGR"])
def test_preprocess_against_hand_computation(order):
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, size=(2, 4, 4, 3), dtype=np.uint8)
    mean, std = [10.0, 120.0, 250.0], [2.0, 64.0, 0.5]
    x = preprocess(faces, hand_card(4, order, mean, std))
    assert x.dtype == np.float32 and x.shape == (2, 3, 4, 4) and x.flags["C_CONTIGUOUS"]
    source = [0, 1, 2] if order == "RGB" else [2, 1, 0]  # which RGB pixel channel feeds network channel c
    expected = np.empty((2, 3, 4, 4))
    for n in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(4):
                    expected[n, c, i, j] = (float(faces[n, i, j, source[c]]) - mean[c]) / std[c]
    np.testing.assert_allclose(x, expected, rtol=1e-6, atol=1e-6)


def test_preprocess_refuses_wrong_input():
    card = hand_card(4, "RGB", [0, 0, 0], [1, 1, 1])
    with pytest.raises(EngineInputError, match="uint8"):
        preprocess(np.zeros((1, 4, 4, 3), np.float32), card)
    with pytest.raises(EngineInputError, match=r"\(N, 4, 4, 3\)"):
        preprocess(np.zeros((1, 5, 5, 3), np.uint8), card)
    with pytest.raises(EngineInputError):
        preprocess(np.zeros((4, 4, 3), np.uint8), card)


def test_unknown_runtime_is_refused():
    with pytest.raises(KeyError, match="onnxruntime"):
        build_engine("no-such-runtime")


# ---------------------------------------------------------------- a tiny exported model


@pytest.fixture(scope="module")
def engine(tiny_model) -> OnnxRuntimeEngine:
    return OnnxRuntimeEngine(tiny_model, intra_op_threads=1)


def test_engine_keeps_the_interface(engine):
    assert isinstance(engine, Engine)
    assert engine.input_size == 112 and engine.embedding_size == EMBEDDING_SIZE and engine.max_batch_size == 64
    assert engine.name == "onnxruntime:tiny:1"
    cpu, cuda = "CPUExecutionProvider", "CUDAExecutionProvider"
    expected = [cuda, cpu] if cuda in ort.get_available_providers() else [cpu]  # CUDA first where the build has it
    assert default_providers() == expected
    # the session runs on that list, less CUDA where its libraries or a device are missing (ONNX Runtime falls back)
    assert engine.providers in (expected, [cpu])
    assert engine.outputs == {"embedding": EMBEDDING_SIZE}  # the tiny model has no style output
    assert "onnxruntime" in ENGINES


def test_embed_a_batch(engine):
    x = preprocess(faces(5), engine.card)
    out = engine.embed(x)
    assert out.shape == (5, EMBEDDING_SIZE) and out.dtype == np.float32 and np.isfinite(out).all()
    norms = np.linalg.norm(out, axis=1)
    assert (norms > 1).all()  # the fixture's scale: tolerances below are meaningful against it
    cosines = (out / norms[:, None]) @ (out / norms[:, None]).T
    assert np.abs(cosines[~np.eye(5, dtype=bool)]).max() < 0.9  # different faces, different embeddings
    assert engine.embed(x[:0]).shape == (0, EMBEDDING_SIZE)


def test_chunking_equals_one_big_batch(tiny_model, engine):
    x = preprocess(faces(10), engine.card)
    small = OnnxRuntimeEngine(tiny_model, intra_op_threads=1, max_batch_size=3)  # chunks of 3, 3, 3, 1
    np.testing.assert_allclose(small.embed(x), engine.embed(x), atol=1e-5, rtol=0)


def test_a_face_alone_and_inside_a_batch_agree(engine):
    x = preprocess(faces(6), engine.card)
    together = engine.embed(x)
    for i in (0, 5):
        np.testing.assert_allclose(engine.embed(x[i : i + 1])[0], together[i], atol=1e-5, rtol=0)


def test_embed_refuses_wrong_batches(engine):
    with pytest.raises(EngineInputError, match="float32"):
        engine.embed(np.zeros((1, 3, 112, 112), np.float64))
    with pytest.raises(EngineInputError, match=r"\(N, 3, 112, 112\)"):
        engine.embed(np.zeros((1, 112, 112, 3), np.float32))


def test_health(engine, monkeypatch):
    assert engine.health() is True

    def broken(chunk):
        raise RuntimeError("device lost")

    monkeypatch.setattr(engine, "_infer", broken)
    assert engine.health() is False


def test_flip_tta_sums_the_mirrored_face(engine):
    batch = faces(3)
    card = engine.card.model_copy(update={"flip_tta": True})
    # mirrored independently, on the uint8 faces: width is axis 2 of (N, H, W, 3)
    expected = engine.embed(preprocess(batch, card)) + engine.embed(preprocess(batch[:, :, ::-1].copy(), card))
    np.testing.assert_allclose(embed_aligned(engine, card, batch), expected, atol=1e-5, rtol=0)
    plain = engine.card.model_copy(update={"flip_tta": False})
    np.testing.assert_array_equal(embed_aligned(engine, plain, batch), engine.embed(preprocess(batch, plain)))


def test_build_engine_by_name(tiny_model):
    built = build_engine("onnxruntime", card=tiny_model.parent, intra_op_threads=1, max_batch_size=8)
    assert isinstance(built, OnnxRuntimeEngine) and built.max_batch_size == 8


def _card_copy(tiny_model: Path, tmp_path: Path, **changes) -> Path:
    card = ModelCard.load(tiny_model)
    (tmp_path / "tiny.onnx").write_bytes(card.onnx_path.read_bytes())
    for key, value in changes.items():
        setattr(card, key, value)
    return card.save(tmp_path / "card.yaml")


def test_card_that_does_not_match_the_graph_is_refused(tiny_model, tmp_path):
    card = ModelCard.load(tiny_model)
    wrong_size = _card_copy(tiny_model, tmp_path, input=card.input.model_copy(update={"size": 128}))
    with pytest.raises(ModelCardError, match="input shape"):
        OnnxRuntimeEngine(wrong_size)
    wrong_width = _card_copy(tiny_model, tmp_path, input=card.input, embedding_size=128)
    with pytest.raises(ModelCardError, match="embedding width 64"):
        OnnxRuntimeEngine(wrong_width)
    no_style = _card_copy(tiny_model, tmp_path, embedding_size=EMBEDDING_SIZE,
                          outputs=card.outputs.model_copy(update={"style": "style", "style_channels": [16]}))
    with pytest.raises(ModelCardError, match="'style'"):
        OnnxRuntimeEngine(no_style)


def test_swapped_onnx_is_refused_before_loading(tiny_model, tmp_path):
    path = _card_copy(tiny_model, tmp_path)
    data = bytearray((tmp_path / "tiny.onnx").read_bytes())
    data[-10] ^= 0xFF
    (tmp_path / "tiny.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelCardError, match="sha256"):
        OnnxRuntimeEngine(path)


def test_graph_with_a_fixed_batch_is_padded(tiny_model, engine, tmp_path):
    """A BYO graph exported for exactly 4 faces: the engine caps its chunks at 4 and pads the last one."""
    card = ModelCard.load(tiny_model)
    graph = onnx.load(str(card.onnx_path))
    for value in [*graph.graph.input, *graph.graph.output]:
        value.type.tensor_type.shape.dim[0].dim_value = 4
    onnx.save(graph, str(tmp_path / "fixed.onnx"))
    card.files.onnx.path = "fixed.onnx"
    card.files.onnx.sha256 = sha256_file(tmp_path / "fixed.onnx")
    fixed = OnnxRuntimeEngine(card.save(tmp_path / "card.yaml"), intra_op_threads=1)
    assert fixed.max_batch_size == 4 and fixed.fixed_batch == 4
    x = preprocess(faces(6), card)
    np.testing.assert_allclose(fixed.embed(x), engine.embed(x), atol=1e-5, rtol=0)


def test_engines_run_without_torch(tiny_model):
    """The service's path: card, engine, preprocessing and inference must never import torch."""
    script = textwrap.dedent(f"""
        import sys
        import numpy as np
        import engines.base, engines.model_card, engines.onnx_runtime
        from engines.base import build_engine, embed_aligned
        engine = build_engine("onnxruntime", card={str(tiny_model)!r}, intra_op_threads=1)
        out = embed_aligned(engine, engine.card, np.zeros((2, 112, 112, 3), np.uint8))
        assert out.shape == (2, {EMBEDDING_SIZE}) and engine.health()
        loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
        print("torch modules:", loaded)
        sys.exit(1 if loaded else 0)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_merge_tta_sums_the_embedding_and_averages_the_style():
    card = hand_card(4, "RGB", [0, 0, 0], [1, 1, 1]).model_copy(update={"flip_tta": True})
    embedding = np.arange(12, dtype=np.float32).reshape(4, 3)  # rows: face 0, face 1, mirror 0, mirror 1
    style = np.array([[1, 2], [3, 4], [5, 8], [7, 0]], np.float32)
    merged = merge_tta({"embedding": embedding, "style": style}, card)
    np.testing.assert_array_equal(merged["embedding"], [[0 + 6, 1 + 7, 2 + 8], [3 + 9, 4 + 10, 5 + 11]])
    np.testing.assert_array_equal(merged["style"], [[(1 + 5) / 2, (2 + 8) / 2], [(3 + 7) / 2, (4 + 0) / 2]])
    plain = card.model_copy(update={"flip_tta": False})
    assert merge_tta({"embedding": embedding}, plain)["embedding"] is embedding  # no TTA: the rows as they came
    with pytest.raises(ValueError, match="'logits'"):
        merge_tta({"embedding": embedding, "logits": embedding}, card)


def test_run_aligned_gives_the_default_models_style_with_tta():
    card = ModelCard.load(DEFAULT_CARD)
    engine = OnnxRuntimeEngine(card, intra_op_threads=1)
    assert card.flip_tta and engine.outputs == {"embedding": 128, "style": 2 * sum(card.outputs.style_channels)}
    faces = np.random.default_rng(0).integers(0, 256, (3, card.input.size, card.input.size, 3), dtype=np.uint8)
    out = run_aligned(engine, card, faces)
    x = preprocess(faces, card)
    view, mirror = engine.run(x), engine.run(np.ascontiguousarray(x[..., ::-1]))
    np.testing.assert_allclose(out["embedding"], view["embedding"] + mirror["embedding"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(out["style"], (view["style"] + mirror["style"]) / 2, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(embed_aligned(engine, card, faces), out["embedding"])
