"""The MTCNN conversion: our torch networks, the shipped ONNX files and, given the wheel, a fresh conversion.

The wheel is not vendored; .ci/run downloads it. To run the conversion tests by hand:
    pip download facenet-pytorch==2.6.0 --no-deps -d /tmp/fnp
    FACESET_MTCNN_WHEEL=/tmp/fnp/facenet_pytorch-2.6.0-py3-none-any.whl pytest tests/training/test_convert_mtcnn.py
"""
from __future__ import annotations

import zipfile

import numpy as np
import onnxruntime as ort
import pytest
import torch
import yaml

from engines.detection.mtcnn import DEFAULT_MODEL_DIR, load_card
from training.convert import mtcnn as convert_mtcnn
from training.convert.mtcnn import NETS, ONet, PNet, RNet, convert, default_parity_images, random_inputs


@pytest.mark.parametrize("side", [12, 13, 37, 150])
def test_pnet_map_size(side):
    reg, prob = PNet().eval()(torch.zeros(1, 3, side, side + 5))
    expect = lambda n: -(-(n - 2) // 2) - 4  # noqa: E731  ceil((n − 2)/2) − 4
    assert prob.shape == (1, expect(side), expect(side + 5))
    assert reg.shape == (1, 4, expect(side), expect(side + 5))


def test_rnet_onet_shapes_and_probabilities():
    reg, prob = RNet().eval()(torch.randn(3, 3, 24, 24))
    assert reg.shape == (3, 4) and prob.shape == (3,)
    reg, prob, landmarks = ONet().eval()(torch.randn(2, 3, 48, 48))
    assert reg.shape == (2, 4) and prob.shape == (2,) and landmarks.shape == (2, 5, 2)
    assert ((prob > 0) & (prob < 1)).all()


def test_onet_landmarks_are_x_then_y():
    net = ONet().eval()
    with torch.no_grad():
        net.dense6_3.weight.zero_()
        net.dense6_3.bias.copy_(torch.arange(10, dtype=torch.float32))  # x0..x4 = 0..4, y0..y4 = 5..9
    _, _, landmarks = net(torch.zeros(1, 3, 48, 48))
    np.testing.assert_array_equal(landmarks[0].detach().numpy(), [[0, 5], [1, 6], [2, 7], [3, 8], [4, 9]])


def test_shipped_card_and_files():
    card = load_card(DEFAULT_MODEL_DIR)  # checks every sha256
    assert set(card["files"]) == set(NETS)
    assert card["landmarks"] == ["left_eye", "right_eye", "nose", "left_mouth", "right_mouth"]
    assert card["thresholds"] == [0.6, 0.7, 0.7] and card["min_face_size"] == 20 and card["scale_factor"] == 0.709
    assert card["provenance"]["wheel_sha256"] == convert_mtcnn.WHEEL_SHA256
    assert all(v <= convert_mtcnn.PARITY_TOL for net in card["parity"]["max_abs_diff"].values() for v in net.values())
    licence = (DEFAULT_MODEL_DIR / "LICENSE").read_text()
    assert "MIT License" in licence and "Timothy Esler" in licence and "Kaipeng Zhang" in licence


@pytest.mark.parametrize("name", list(NETS))
def test_shipped_onnx_runs_with_dynamic_batch(name):
    session = ort.InferenceSession(str(DEFAULT_MODEL_DIR / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(NETS[name].outputs)
    for x in random_inputs(name, seed=1):
        outputs = session.run(None, {"image": x})
        assert all(o.shape[0] == x.shape[0] and np.isfinite(o).all() for o in outputs)


def test_rejects_a_wheel_with_another_checksum(tmp_path):
    fake = tmp_path / convert_mtcnn.WHEEL_NAME
    with zipfile.ZipFile(fake, "w") as z:
        z.writestr("facenet_pytorch/data/pnet.pt", b"not a checkpoint")
    with pytest.raises(ValueError, match="sha256"):
        convert(fake, tmp_path / "out")


def test_conversion_parity_and_matches_shipped_files(wheel, tmp_path):
    card = convert(wheel, tmp_path, default_parity_images(4))
    for name, diffs in card["parity"]["max_abs_diff"].items():
        assert max(diffs.values()) <= 1e-4, (name, diffs)
    assert yaml.safe_load((tmp_path / "card.yaml").read_text()) == card
    # the shipped files compute what a fresh conversion computes
    for name in NETS:
        fresh = ort.InferenceSession(str(tmp_path / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        shipped = ort.InferenceSession(str(DEFAULT_MODEL_DIR / f"{name}.onnx"), providers=["CPUExecutionProvider"])
        for x in random_inputs(name, seed=2):
            for a, b in zip(fresh.run(None, {"image": x}), shipped.run(None, {"image": x})):
                np.testing.assert_allclose(a, b, atol=1e-6)


def test_failed_parity_replaces_nothing(wheel, tmp_path, monkeypatch):
    monkeypatch.setattr(convert_mtcnn, "PARITY_TOL", -1.0)  # no export can pass
    with pytest.raises(RuntimeError, match="differ"):
        convert(wheel, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither ONNX files nor leftover temp files
