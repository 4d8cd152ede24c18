"""faceset model fuse: a CAFace fusion model for a model we did not train (the default's trainer), then served."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from engines.fusion import FusionCard
from engines.model_card import ModelCard
from service.app import create_app
from tests.helpers import anchor_card, celeba_people, drop_keys, gallery_header, make_settings
from training.cli import model_fuse_app

pytestmark = [pytest.mark.data, pytest.mark.slow]

PEOPLE = 8


@pytest.fixture(scope="module")
def photos(data_dir, tmp_path_factory) -> Path:
    """A folder per person: the first PEOPLE CelebA-10k identities with 3+ photos and one with a single photo."""
    root = tmp_path_factory.mktemp("photos")
    folders = sorted(p for p in (data_dir / "celeba-10k-aligned").iterdir() if p.is_dir())
    many = [d for d in folders if len(list(d.iterdir())) >= 3][:PEOPLE]
    single = next(d for d in folders if len(list(d.iterdir())) == 1)
    for person in [*many, single]:
        (root / person.name).mkdir()
        for f in person.iterdir():
            (root / person.name / f.name).symlink_to(f)
    return root


def test_fuse_an_imported_model_and_serve_its_templates(data_dir, anchors_dir, photos, tmp_path):
    model = anchor_card(anchors_dir, tmp_path / "model")
    imported = ModelCard.load(model)
    run = CliRunner().invoke(model_fuse_app, ["fuse", str(model), "--data", str(photos), "--work", str(tmp_path / "work"),
                                              "--steps", "20", "--batch-sets", "8", "--eval-every", "4",
                                              "--no-quality-head"])  # the head: tests/training/caface/test_quality_head.py
    assert run.exit_code == 0, run.output
    card, (fusion, _) = ModelCard.load(model), FusionCard.load(model / "fusion")
    imported.verify_files()  # tapped on a copy: the imported ONNX is unchanged
    assert card.files.onnx.path != imported.files.onnx.path and card.root == imported.root
    assert card.outputs.style_channels == [128, 256, 512, 512] and card.quality is None
    assert fusion.recognition.onnx_sha256 == card.files.onnx.sha256
    assert (fusion.embedding_size, fusion.style_size) == (128, 2 * sum(card.outputs.style_channels))
    assert fusion.licence.startswith("not stated") and str(photos) in fusion.training.data
    assert 0 < fusion.quality.low < fusion.quality.high  # the features' magnitudes: the card has no quality range
    assert fusion.parity.aggregate_min_cosine >= 0.99999

    settings = make_settings(model_card=model, fusion_card=model / "fusion")
    same, other = celeba_people(data_dir, 0, 2, photos=4)
    tid = f"{settings.key_prefix.strip(':')}.fused"
    try:
        with TestClient(create_app(settings)) as client:
            assert client.app.state.templates is not None, client.app.state.templates_off
            added = client.post(f"/templates/{tid}/frames", files=[("images", p) for p in same[:3]])
            assert added.status_code == 200 and added.json()["accepted"] == 3, added.text
            template = client.get(f"/templates/{tid}").json()
            assert template["frames"] == 3 and 0 < template["quality"] <= 1
            probes = client.post("/embed", files=[("images", same[3]), ("images", other[0])]).json()["results"]
            mate, stranger = (np.array(r["faces"][0]["embedding"]) for r in probes)
            fused = np.array(template["embedding"])
            assert fused @ mate > fused @ stranger
            enrolled = client.post("/gallery/p", files=[("images", p) for p in same[:2]],
                                   headers=gallery_header(settings, "fuse"))
            assert enrolled.json()["fusion"] == "caface", enrolled.text
    finally:
        drop_keys(settings)
