"""engines.quality_sources: the card's quality through its source (a MagFace magnitude or a learned head), and
calibration trying each source a card offers with the same error-versus-reject check (torch-free: the head here is
a hand-made ONNX that reads one style column)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from engines.base import EMBEDDING, STYLE
from engines.calibration import calibrate
from engines.model_card import ModelCard, ModelCardError, Quality, sha256_file
from engines.quality_sources import HEAD_INPUTS, HEAD_OUTPUT, QUALITY_SOURCES, candidates, card_source, face_quality

STYLE_CHANNELS = [2]  # a style row of 4: (mean, std) of two channels


def head_onnx(path: Path, width: int = 4) -> Path:
    """A head whose score is style[:, 0] + 0·magnitude: whatever the first style column says."""
    pick = np.zeros((width, 1), np.float32)
    pick[0, 0] = 1
    nodes = [helper.make_node("MatMul", [HEAD_INPUTS[0], "pick"], ["picked"]),  # (N, 1)
             helper.make_node("Mul", [HEAD_INPUTS[1], "zero"], ["ignored"]),  # (N, 1)
             helper.make_node("Add", ["picked", "ignored"], [HEAD_OUTPUT])]
    graph = helper.make_graph(
        nodes, "head", [helper.make_tensor_value_info(HEAD_INPUTS[0], TensorProto.FLOAT, ["N", width]),
                        helper.make_tensor_value_info(HEAD_INPUTS[1], TensorProto.FLOAT, ["N", 1])],
        [helper.make_tensor_value_info(HEAD_OUTPUT, TensorProto.FLOAT, ["N", 1])],
        [numpy_helper.from_array(pick, "pick"), numpy_helper.from_array(np.zeros(1, np.float32), "zero")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def card_with_head(folder: Path, magface: bool = False) -> ModelCard:
    head = head_onnx(folder / "quality-head.onnx")
    return ModelCard.model_validate({
        "name": "t", "version": "1", "architecture": "x", "embedding_size": 16, "licence": "none",
        "files": {"onnx": {"path": "t.onnx", "sha256": "0" * 64}},
        "input": {"size": 112, "template": "arcface_112", "mean": [127.5] * 3, "std": [127.5] * 3},
        "outputs": {"style": "style", "style_channels": STYLE_CHANNELS},
        "provenance": {"source": "test"},
        "magnitude": {"l_a": 10.0, "u_a": 110.0} if magface else None,
        "quality_head": {"onnx": {"path": head.name, "sha256": sha256_file(head)}, "target": "t", "data": "d",
                         "validation": "v", "parity_max_abs_diff": 0.0},
    }).set_root(folder)


def degraded_faces(n_ids=150, per=6, seed=0):
    """Faces whose direction drifts from their identity's with a degradation d in [0, 1] (errors grow with d);
    the norm is unrelated to d (a plain model); returns (emb, labels, d)."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0, 1, n_ids * per)
    direction = np.repeat(rng.normal(size=(n_ids, 16)), per, axis=0) + rng.normal(size=(n_ids * per, 16)) * d[:, None]
    emb = direction / np.linalg.norm(direction, axis=1, keepdims=True) * rng.uniform(20, 50, d.size)[:, None]
    return emb, np.repeat(np.arange(n_ids), per), d


def style_rows(first: np.ndarray, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([first[:, None], rng.normal(size=(len(first), 3))], axis=1).astype(np.float32)  # (N, 4)


def test_a_head_that_predicts_errors_becomes_the_quality(tmp_path):
    emb, labels, d = degraded_faces()
    card = calibrate(card_with_head(tmp_path), emb, labels, "synthetic", style=style_rows(1 - d))
    (check,) = card.calibration.quality_checks
    assert check.source == "learned_head" and check.used and check.fnmr[-1] <= 0.9 * check.fnmr[0]
    assert card.quality.method == "learned_head" and card.calibration.floors is not None
    assert card.quality.low == pytest.approx(np.percentile(1 - d, 1), abs=1e-5)  # the hold-out's head scores
    assert card.quality.high == pytest.approx(np.percentile(1 - d, 99), abs=1e-5)


def test_a_head_unrelated_to_errors_is_refused_and_quality_is_null(tmp_path):
    emb, labels, d = degraded_faces()
    noise = np.random.default_rng(3).uniform(size=d.size)
    card = calibrate(card_with_head(tmp_path), emb, labels, "synthetic", style=style_rows(noise))
    (check,) = card.calibration.quality_checks
    assert check.source == "learned_head" and not check.used
    assert card.quality is None and card.calibration.floors is None and card.calibration.quality_bands == []


def test_without_style_the_head_is_not_a_candidate_and_the_better_of_two_sources_is_used(tmp_path):
    emb, labels, d = degraded_faces()
    card = card_with_head(tmp_path, magface=True)
    assert candidates(card, {EMBEDDING: emb, STYLE: None}).keys() == {"magnitude"}  # cached embeddings: no style
    both = calibrate(card, emb, labels, "synthetic", style=style_rows(1 - d))
    by_source = {c.source: c for c in both.calibration.quality_checks}
    assert by_source.keys() == {"magnitude", "learned_head"} and not by_source["magnitude"].used
    assert by_source["learned_head"].used and both.quality.method == "learned_head"


def test_face_quality_goes_through_the_cards_source(tmp_path):
    card = card_with_head(tmp_path)
    card.quality = Quality(method="learned_head", low=-1.0, high=1.0)
    emb = np.random.default_rng(0).normal(size=(5, 16))
    first = np.array([-2.0, -1.0, 0.0, 0.5, 3.0])
    assert isinstance(card_source(card), QUALITY_SOURCES.get("learned_head"))
    np.testing.assert_allclose(face_quality(card, {EMBEDDING: emb, STYLE: style_rows(first)}),
                               np.clip((first + 1) / 2, 0, 1), atol=1e-6)
    with pytest.raises(ModelCardError, match="style output"):
        face_quality(card, {EMBEDDING: emb, STYLE: None})
    # a photo without a face: no rows, and the service has no style rows to give either
    assert face_quality(card, {EMBEDDING: np.zeros((0, 16)), STYLE: None}).shape == (0,)
    card.quality = Quality(method="magface_linear", low=10.0, high=30.0)
    np.testing.assert_allclose(face_quality(card, {EMBEDDING: emb}),
                               np.clip((np.linalg.norm(emb, axis=1) - 10) / 20, 0, 1))


def test_a_learned_quality_needs_its_head_and_the_style_output(tmp_path):
    data = card_with_head(tmp_path).model_dump()
    data["quality"] = {"method": "learned_head", "low": 0.0, "high": 1.0}
    ModelCard.model_validate(data)
    with pytest.raises(ValueError, match="quality_head"):
        ModelCard.model_validate({**data, "quality_head": None})
