"""engines.style_taps: a copy of a model we did not train, with CAFace style statistics of its intermediate maps."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from engines.base import preprocess
from engines.model_card import ModelCard
from engines.onnx_runtime import OnnxRuntimeEngine
from engines.style_taps import StyleTapError, add_style_taps, choose_taps, feature_maps
from tests.helpers import anchor_card

pytestmark = pytest.mark.data


@pytest.fixture(scope="module")
def anchor(anchors_dir, tmp_path_factory) -> Path:
    return anchor_card(anchors_dir, tmp_path_factory.mktemp("anchor") / "model")


@pytest.fixture(scope="module")
def faces(data_dir) -> np.ndarray:
    """Eight LFW photos' centres at 112 px: real pixel statistics (alignment does not matter here)."""
    paths = sorted((data_dir / "lfw-dev" / "images").glob("*.jpg"))[:8]
    crops = [cv2.resize(cv2.imread(str(p))[60:190, 60:190], (112, 112), interpolation=cv2.INTER_AREA) for p in paths]
    return np.stack([cv2.cvtColor(c, cv2.COLOR_BGR2RGB) for c in crops])


def tap_values(card: ModelCard, names: list[str], x: np.ndarray) -> list[np.ndarray]:
    """The named tensors of the card's graph on input x, exposed as outputs of another copy."""
    model = onnx.load(str(card.onnx_path))
    model.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(names, {session.get_inputs()[0].name: x})


def test_the_last_map_of_each_resolution_is_tapped(anchor):
    card = ModelCard.load(anchor)
    maps = feature_maps(onnx.load(str(card.onnx_path)), card.input.size)
    taps = choose_taps(maps)
    # 112 px in, four downsamplings (each stage ends in the expansion feeding the strided depthwise conv); the
    # 512×1×1 map after the global depthwise conv has no spread
    assert [(m.channels, m.height, m.width) for m in taps] == [(128, 56, 56), (256, 28, 28), (512, 14, 14), (512, 7, 7)]
    assert all(m.node == max(n.node for n in maps if (n.height, n.width) == (m.height, m.width)) for m in taps)
    assert any((m.height, m.width) == (1, 1) for m in maps)


def test_the_tapped_copy_keeps_the_embedding_and_adds_the_declared_style(anchor, faces, tmp_path):
    original = ModelCard.load(anchor)
    card = add_style_taps(original, tmp_path, faces=faces)
    original.verify_files()  # the imported ONNX is only read
    assert ModelCard.load(tmp_path).model_dump() == card.model_dump() and card.outputs.style == "style"
    assert card.outputs.style_channels == [128, 256, 512, 512] and card.input == original.input
    assert card.files.onnx.path == "mobilefacenet-a-style.onnx" and "max |Δ|" in card.provenance.notes

    x = preprocess(faces, card)
    old = OnnxRuntimeEngine(original, providers=["CPUExecutionProvider"], intra_op_threads=1).run(x)
    new = OnnxRuntimeEngine(card, providers=["CPUExecutionProvider"], intra_op_threads=1).run(x)
    assert np.abs(new["embedding"] - old["embedding"]).max() <= 1e-5 * np.abs(old["embedding"]).max()
    assert new["style"].shape == (len(faces), 2 * sum(card.outputs.style_channels))

    # the layout of training.export.style_statistics: per channel (mean, std with n − 1), maps shallowest first
    names = [m.name for m in choose_taps(feature_maps(onnx.load(str(original.onnx_path)), 112))]
    expected = np.concatenate([np.stack([m.mean(axis=(2, 3)), m.std(axis=(2, 3), ddof=1)], axis=2).reshape(len(x), -1)
                               for m in (v.astype(np.float64) for v in tap_values(original, names, x))], axis=1)
    np.testing.assert_allclose(new["style"], expected, rtol=1e-4, atol=1e-5)


def test_named_taps_and_what_is_refused(anchor, tmp_path):
    card = ModelCard.load(anchor)
    named = add_style_taps(card, tmp_path / "named", taps=["batch_norm_18.tmp_2", "batch_norm_3.tmp_2"])
    assert named.outputs.style_channels == [128, 256]  # graph order, shallowest first, whatever order they were named
    with pytest.raises(StyleTapError, match="already has the style output"):
        add_style_taps(named, tmp_path / "again")
    with pytest.raises(StyleTapError, match="no_such_tensor"):
        add_style_taps(card, tmp_path / "unknown", taps=["no_such_tensor"])
    with pytest.raises(StyleTapError, match="batch_norm_48.tmp_2"):  # 512×1×1: one position, no standard deviation
        add_style_taps(card, tmp_path / "flat", taps=["batch_norm_48.tmp_2"])
    assert not (tmp_path / "unknown").exists() or not list((tmp_path / "unknown").iterdir())
