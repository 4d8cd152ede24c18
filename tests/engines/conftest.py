"""Fixtures of the engines tests: a tiny exported model shared by every runtime's tests."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import EMBEDDING_SIZE


@pytest.fixture(scope="package")
def tiny_model(tmp_path_factory) -> Path:
    """A random-weight MobileFaceNet (width 0.25, D = EMBEDDING_SIZE) exported by training.export: its card.yaml."""
    torch = pytest.importorskip("torch")
    from training.export import export_onnx
    from training.models import build_backbone, settle_batchnorm

    torch.set_num_threads(1)
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    model = build_backbone("mobilefacenet", embedding_size=EMBEDDING_SIZE, width_mult=0.25)
    settle_batchnorm(model, (torch.rand(16, 3, 112, 112) * 2 - 1 for _ in range(2)))  # a trained network's scale
    torch.save({"backbone": model.state_dict(), "arch": "mobilefacenet", "embedding_size": EMBEDDING_SIZE,
                "kwargs": {"width_mult": 0.25}, "input_size": 112}, root / "backbone.pt")
    export_onnx(root / "backbone.pt", root / "model", "tiny", "1", {"licence": "test"})
    return root / "model" / "card.yaml"
