"""training.recipes.add_style_output: the shipped default model's embedding layer is read back exactly as the export
traced it, and the shipped card's style output is what CAFace reads."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from engines.base import preprocess
from engines.model_card import ModelCard
from engines.onnx_runtime import OnnxRuntimeEngine
from training.models import build_backbone
from training.recipes.add_style_output import embedding_layer, rebuild_backbone

DEFAULT = Path(__file__).resolve().parents[2] / "models" / "default"


def test_the_shipped_head_is_matmul_then_the_output_scale():
    card = ModelCard.load(DEFAULT, verify=False)
    weight, scale = embedding_layer(card.onnx_path, card.outputs.embedding)
    assert weight.shape == (256, card.embedding_size) and scale == 20.0


def test_a_transplanted_head_reproduces_the_embedding(tmp_path):
    """fc.weight = Wᵀ with output_scale s gives embed = mean_hw(x) @ W · s, what the export traced."""
    torch.manual_seed(0)
    donor = build_backbone("dlib_resnet34", output_scale=20.0).eval()
    torch.save({"state_dict": donor.state_dict()}, tmp_path / "dlib.pt")
    weight = np.random.default_rng(0).normal(size=(256, 128)).astype(np.float32) * 0.01
    model = rebuild_backbone(tmp_path / "dlib.pt", weight, 20.0)
    feat = torch.randn(2, 256, 2, 2)
    expected = feat.mean(dim=(2, 3)).numpy() @ weight * 20.0
    np.testing.assert_allclose(model.embed(feat).detach().numpy(), expected, rtol=1e-5, atol=1e-5)


def test_the_default_card_gives_embeddings_and_style_in_one_pass():
    card = ModelCard.load(DEFAULT)
    assert card.outputs.style == "style" and card.outputs.style_channels == [32, 64, 128, 256, 256]
    engine = OnnxRuntimeEngine(card, intra_op_threads=1)
    faces = np.random.default_rng(0).integers(0, 256, size=(2, 150, 150, 3), dtype=np.uint8)
    x = preprocess(faces, card)
    out = engine.run(x)
    embedding, style = out["embedding"], out["style"]
    assert embedding.shape == (2, 128) and style.shape == (2, 2 * sum(card.outputs.style_channels))
    np.testing.assert_allclose(embedding, engine.embed(x), rtol=1e-6, atol=1e-5)
