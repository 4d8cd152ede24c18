from __future__ import annotations

import numpy as np
import pytest

from engines.base import Engine, build_engine, embed_aligned, preprocess
from engines.model_card import ModelCard, ModelCardError
from engines.onnx_runtime import OnnxRuntimeEngine
from tests.helpers import EMBEDDING_SIZE, cosines, faces

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def checkpoint(tiny_model):
    return tiny_model.parent.parent / "backbone.pt"  # what the fixture exported the ONNX from


@pytest.fixture(scope="module")
def torch_engine(tiny_model, checkpoint):
    return build_engine("torch", checkpoint=checkpoint, card=tiny_model, threads=1)


def test_torch_engine_keeps_the_interface(torch_engine):
    assert isinstance(torch_engine, Engine)
    assert torch_engine.name == "torch:tiny:1"
    assert (torch_engine.input_size, torch_engine.embedding_size) == (112, EMBEDDING_SIZE)
    assert torch_engine.health()


def test_parity_with_the_onnx_engine(tiny_model, torch_engine):
    onnx_engine = OnnxRuntimeEngine(tiny_model, intra_op_threads=1)
    crops = faces(6, seed=3)
    a = embed_aligned(torch_engine, torch_engine.card, crops)
    b = embed_aligned(onnx_engine, onnx_engine.card, crops)
    assert cosines(a, b).min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1), rtol=1e-3)
    assert cosines(a, np.roll(b, 1, axis=0)).max() < 0.99  # different faces stay apart


def test_the_cards_scaling_and_channel_order_are_honoured(tiny_model, checkpoint, torch_engine):
    # the same backbone under a BGR card with x = p/255: the engine must undo it to (p − 127.5)/127.5 RGB
    card = ModelCard.load(tiny_model)
    bgr = card.model_copy(update={"input": card.input.model_copy(
        update={"channel_order": "BGR", "mean": [0.0, 0.0, 0.0], "std": [255.0, 255.0, 255.0]})})
    bgr.set_root(card.root)
    engine = build_engine("torch", checkpoint=checkpoint, card=bgr)
    crops = faces(3, seed=4)
    x_bgr = preprocess(crops, bgr)
    assert not np.allclose(x_bgr, preprocess(crops, card))  # the two cards really feed different tensors
    np.testing.assert_allclose(engine.embed(x_bgr), torch_engine.embed(preprocess(crops, card)), rtol=0, atol=2e-4)


def test_a_card_that_does_not_match_the_checkpoint_is_refused(tiny_model, checkpoint):
    card = ModelCard.load(tiny_model)
    wrong = card.model_copy(update={"embedding_size": EMBEDDING_SIZE + 1})
    with pytest.raises(ModelCardError, match="embedding width"):
        build_engine("torch", checkpoint=checkpoint, card=wrong)
