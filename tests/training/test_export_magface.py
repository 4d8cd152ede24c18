"""Official MagFace checkpoints -> ONNX + card, on a synthetic checkpoint of the same structure."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from engines.base import embed_aligned
from engines.model_card import ModelCard
from engines.onnx_runtime import OnnxRuntimeEngine
from training.export import MAGFACE_BN_EPS, export_magface_checkpoint, load_magface_backbone
from training.models import build_backbone

D = 32


@pytest.fixture(scope="module")
def magface_pth(tmp_path_factory):
    """An iresnet18 saved the way MagFace's trainer saves it: backbone under `features.module.`,
    its classifier's `fc.weight` beside it, all under "state_dict". Returns (path, the backbone)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = build_backbone("iresnet18", embedding_size=D)
    for module in model.modules():  # realistic activation scale: BN statistics from a random batch
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None
    model.train()
    with torch.no_grad():
        model(torch.rand(4, 3, 112, 112))  # MagFace's input range, p/255
    model.eval()
    state = {f"features.module.{k}": v for k, v in model.state_dict().items()}
    state["fc.weight"] = torch.randn(10, D)  # MagFace's MagLinear classifier: not part of the backbone
    path = tmp_path_factory.mktemp("magface") / "magface_iresnet18.pth"
    torch.save({"epoch": 25, "arch": "iresnet18", "state_dict": state}, path)
    return path, model


def test_the_checkpoint_loads_strictly_with_magface_bn_eps(magface_pth):
    path, model = magface_pth
    loaded = load_magface_backbone(path, "iresnet18", embedding_size=D)
    inner = loaded.model.backbone
    for key, value in model.state_dict().items():
        assert torch.equal(inner.state_dict()[key], value), key
    eps = {m.eps for m in inner.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert eps == {MAGFACE_BN_EPS}
    assert "fc.weight" in loaded.card_defaults["provenance"]["notes"]


def test_export_reproduces_magface_preprocessing(magface_pth, tmp_path):
    path, model = magface_pth
    card = export_magface_checkpoint(path, "iresnet18", tmp_path / "out", "magface-test", licence="test",
                                     embedding_size=D)
    card = ModelCard.load(tmp_path / "out")
    assert (card.input.channel_order, card.input.mean, card.input.std) == ("BGR", [0.0] * 3, [255.0] * 3)
    assert card.input.template == "arcface_112" and card.embedding_size == D and not card.flip_tta
    assert (card.magnitude.l_a, card.magnitude.u_a) == (10.0, 110.0) and card.parity.min_cosine >= 0.9999
    faces = np.random.default_rng(7).integers(0, 256, size=(3, 112, 112, 3), dtype=np.uint8)
    # what MagFace's gen_feat.py feeds its network: BGR, p/255, computed here without the card
    bgr = faces[..., ::-1].astype(np.float64) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(bgr.transpose(0, 3, 1, 2)).astype(np.float32))  # (N, 3, S, S)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.eps = MAGFACE_BN_EPS
    with torch.no_grad():
        expected = model(x).numpy().astype(np.float64)
    got = embed_aligned(OnnxRuntimeEngine(card, intra_op_threads=1), card, faces).astype(np.float64)
    cosine = (got * expected).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(expected, axis=1))
    assert cosine.min() >= 0.9999
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), np.linalg.norm(expected, axis=1), rtol=1e-3)
    # the same faces read as RGB would give other embeddings: the channel order matters to this check
    rgb = torch.from_numpy(np.ascontiguousarray((faces / 255.0).transpose(0, 3, 1, 2)).astype(np.float32))
    with torch.no_grad():
        wrong = model(rgb).numpy().astype(np.float64)
    assert np.abs(wrong - expected).max() > 1e-2 * np.abs(expected).max()
