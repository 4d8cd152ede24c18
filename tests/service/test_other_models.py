"""Any model card through FACESET_MODEL_CARD: the service serves it, and what it lacks is said, not faked."""
from __future__ import annotations

import io

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from tests.helpers import drop_keys, make_settings


@pytest.fixture(scope="module")
def tiny_card(tmp_path_factory):
    """A random-weight MobileFaceNet (D = 64, 112 px, no calibration, no style output) exported by training.export."""
    torch = pytest.importorskip("torch")
    from training.export import export_onnx
    from training.models import build_backbone

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("tiny")
    model = build_backbone("mobilefacenet", embedding_size=64, width_mult=0.25)
    torch.save({"backbone": model.state_dict(), "arch": "mobilefacenet", "embedding_size": 64,
                "kwargs": {"width_mult": 0.25}, "input_size": 112}, root / "backbone.pt")
    export_onnx(root / "backbone.pt", root / "model", "tiny", "7", {"licence": "test"})
    return root / "model"


@pytest.fixture(scope="module")
def tiny_client(tiny_card, redis_available):
    settings = make_settings(model_card=tiny_card)
    with TestClient(create_app(settings)) as c:
        yield c
    drop_keys(settings)


def test_another_model_is_served(tiny_client, data_dir):
    photo = (data_dir / "lfw-dev" / "images" / "Abel_Pacheco_0001.jpg").read_bytes()
    body = tiny_client.post("/embed", files=[("images", photo)]).json()
    assert body["model"] == {"name": "tiny", "version": "7", "embedding_size": 64}
    assert tiny_client.app.state.batcher.engine.name.startswith("onnxruntime")  # the runtime the service ships
    (face,) = body["results"][0]["faces"]
    assert len(face["embedding"]) == 64 and abs(np.linalg.norm(face["embedding"]) - 1) < 1e-5
    assert face["quality"] is None  # the card has no quality mapping: none is invented


def test_what_the_card_lacks_is_a_clear_answer(tiny_client):
    r = tiny_client.post("/verify", json={"a": {"embedding": [1.0] * 64}, "b": {"embedding": [1.0] * 64}})
    assert r.status_code == 422 and "calibration" in r.json()["error"]["message"]
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, format="PNG")
    assert tiny_client.post("/embed", files=[("images", buf.getvalue())]).json()["results"] == [{"faces": []}]
    gated = tiny_client.post("/embed", params={"min_quality": 0.5}, files=[("images", buf.getvalue())])
    assert gated.status_code == 422 and "quality gating is off for model 'tiny'" in gated.json()["error"]["message"]
    assert tiny_client.get("/readyz").status_code == 200


def test_a_card_without_the_style_output_serves_faces_with_templates_off(tiny_client, data_dir):
    """The tiny card has no CAFace style output: faces are served on ONNX Runtime, templates answer 503 and say why."""
    assert "no CAFace style output" in tiny_client.app.state.templates_off
    frame = {"embedding": [1.0] * 64, "style": []}
    for off in (tiny_client.get("/templates/anyone"),
                tiny_client.post("/templates/anyone/frames", json={"frames": [frame]})):
        assert off.status_code == 503 and "no CAFace style output" in off.json()["error"]["message"]
    photo = (data_dir / "lfw-dev" / "images" / "Abel_Pacheco_0001.jpg").read_bytes()
    faces = tiny_client.post("/embed", params={"include_style": True}, files=[("images", photo)]).json()
    assert faces["results"][0]["faces"][0]["style"] is None  # none is invented either
    assert tiny_client.get("/readyz").status_code == 200
