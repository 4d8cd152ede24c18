from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.base import embed_aligned
from engines.insightface_cards import card_for_insightface_onnx
from engines.model_card import ModelCard, ModelCardError, sha256_file
from engines.onnx_runtime import OnnxRuntimeEngine

D = 16


def insightface_like_onnx(path: Path, size: int = 112, weights_as_inputs: bool = True) -> np.ndarray:
    """A graph with insightface's recognition signature: input 'input.1' (None, 3, 112, 112) -> '683' (None, 16).

    It computes f = mean over pixels of x (per channel) @ W + b; returns W stacked over b, (4, D).
    Like graphs from older insightface exporters, it lists its weights as graph inputs too.
    """
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, D)).astype(np.float32)
    b = rng.normal(size=(D,)).astype(np.float32)
    nodes = [helper.make_node("GlobalAveragePool", ["input.1"], ["pooled"]),  # (N, 3, 1, 1)
             helper.make_node("Flatten", ["pooled"], ["flat"]),  # (N, 3)
             helper.make_node("Gemm", ["flat", "fc.weight", "fc.bias"], ["683"])]  # (N, D)
    x = helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, size, size])
    y = helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", D])
    initialisers = [numpy_helper.from_array(w, "fc.weight"), numpy_helper.from_array(b, "fc.bias")]
    extra = [helper.make_tensor_value_info(t.name, TensorProto.FLOAT, list(t.dims)) for t in initialisers]
    graph = helper.make_graph(nodes, "insightface-like", [x] + (extra if weights_as_inputs else []), [y],
                              initialisers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return np.concatenate([w, b[None]])


def test_card_reads_the_graph_and_runs_like_insightface(tmp_path):
    wb = insightface_like_onnx(tmp_path / "w600k_r50.onnx")
    card = card_for_insightface_onnx(tmp_path / "w600k_r50.onnx", name="w600k-r50")
    assert card.outputs.embedding == "683" and card.embedding_size == D
    assert (card.input.size, card.input.template, card.input.channel_order) == (112, "arcface_112", "RGB")
    assert card.input.mean == [127.5] * 3 and card.input.std == [127.5] * 3
    assert card.files.onnx.sha256 == sha256_file(tmp_path / "w600k_r50.onnx")
    card.save(tmp_path)  # beside the ONNX
    loaded = ModelCard.load(tmp_path)  # verifies the sha256
    engine = OnnxRuntimeEngine(loaded, intra_op_threads=1)
    faces = np.random.default_rng(2).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    # insightface: RGB, (p − 127.5)/127.5, averaged by the graph, then the linear layer; float64 here
    x = (faces.astype(np.float64) - 127.5) / 127.5
    expected = x.mean(axis=(1, 2)) @ wb[:3].astype(np.float64) + wb[3]
    np.testing.assert_allclose(embed_aligned(engine, loaded, faces), expected, rtol=1e-4, atol=1e-5)


def test_card_accepts_graphs_without_weights_as_inputs(tmp_path):
    insightface_like_onnx(tmp_path / "m.onnx", weights_as_inputs=False)
    assert card_for_insightface_onnx(tmp_path / "m.onnx", name="m").embedding_size == D


def test_a_graph_of_another_shape_is_refused(tmp_path):
    insightface_like_onnx(tmp_path / "big.onnx", size=160)
    with pytest.raises(ModelCardError, match=r"\(N, 3, 112, 112\)"):
        card_for_insightface_onnx(tmp_path / "big.onnx", name="big")
