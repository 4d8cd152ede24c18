from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from engines.model_card import (
    ModelCard,
    ModelCardError,
    fpir_threshold,
    quality_band,
    quality_from_magnitude,
    resolve_far,
    threshold_at,
)

REPO = Path(__file__).resolve().parents[2]

ONNX_BYTES = b"not really an onnx graph, but bytes with a known sha256"


def card_dict(**changes) -> dict:
    data = {
        "name": "faceset-test",
        "version": "3",
        "architecture": "mobilefacenet",
        "files": {"onnx": {"path": "model.onnx", "sha256": hashlib.sha256(ONNX_BYTES).hexdigest()}},
        "input": {"size": 112, "template": "arcface_112", "channel_order": "RGB",
                  "mean": [127.5, 127.5, 127.5], "std": [127.5, 127.5, 127.5], "layout": "NCHW"},
        "embedding_size": 512,
        "flip_tta": True,
        "magnitude": {"l_a": 10.0, "u_a": 110.0},
        "quality": {"method": "magface_linear", "low": 10.0, "high": 110.0},
        "calibration": {"thresholds": {1e-2: 0.2, 1e-3: 0.3, 1e-4: 0.4}, "dataset": "celeba-299 held-out identities",
                        "positive_pairs": 5000, "negative_pairs": 200_000, "method": "quantile of impostor cosines"},
        "training": {"data": "celeba-10k-aligned", "licence": "CelebA: non-commercial research only",
                     "recipe": "faceset train celeba-mbf-magface", "notes": None},
        "accuracy": [{"benchmark": "LFW dev fold", "value": 99.1, "std": 0.4, "protocol": "10-fold, detect-align-embed"}],
        "licence": "CC-BY-NC-4.0",
        "provenance": {"source": "runs/x/backbone.pt", "exporter": "torch 2.13.0"},
    }
    data.update(changes)
    return data


@pytest.fixture
def model_dir(tmp_path):
    (tmp_path / "model.onnx").write_bytes(ONNX_BYTES)
    ModelCard.model_validate(card_dict()).save(tmp_path / "card.yaml")
    return tmp_path


def test_yaml_round_trip(model_dir):
    card = ModelCard.load(model_dir / "card.yaml")
    assert card.model_dump() == ModelCard.model_validate(card_dict()).model_dump()
    assert card.onnx_path == model_dir / "model.onnx"
    assert card.calibration.thresholds == {1e-2: 0.2, 1e-3: 0.3, 1e-4: 0.4}
    # the folder works as well as the file, and the YAML keeps FARs as numbers
    assert ModelCard.load(model_dir).model_dump() == card.model_dump()
    raw = yaml.safe_load((model_dir / "card.yaml").read_text())
    assert set(raw["calibration"]["thresholds"]) == {0.01, 0.001, 0.0001}


def test_save_is_atomic_and_leaves_no_temp_files(model_dir):
    card = ModelCard.load(model_dir)
    card.version = "4"
    card.save(model_dir)
    assert sorted(p.name for p in model_dir.iterdir()) == ["card.yaml", "model.onnx"]
    assert ModelCard.load(model_dir).version == "4"


def test_integer_version_is_read_as_text():
    assert ModelCard.model_validate(card_dict(version=7)).version == "7"


@pytest.mark.parametrize("where", ["top", "input", "calibration", "provenance"])
def test_unknown_keys_are_refused(where):
    data = card_dict()
    target = data if where == "top" else data[where]
    target["scaling"] = "x/255"
    with pytest.raises(ValidationError, match="scaling"):
        ModelCard.model_validate(data)


def test_missing_required_field_is_refused():
    data = card_dict()
    del data["licence"]
    with pytest.raises(ValidationError, match="licence"):
        ModelCard.model_validate(data)


@pytest.mark.parametrize("field, value", [
    ("input", {"size": 112, "template": "arcface_112", "channel_order": "RGB", "mean": [0, 0], "std": [1, 1, 1]}),
    ("input", {"size": 112, "template": "arcface_112", "channel_order": "RGB", "mean": [0, 0, 0], "std": [1, 0, 1]}),
    ("input", {"size": 112, "template": "arcface_112", "channel_order": "BRG", "mean": [0, 0, 0], "std": [1, 1, 1]}),
    ("quality", {"method": "magface_linear", "low": 20.0, "high": 10.0}),
    ("magnitude", {"l_a": 110.0, "u_a": 10.0}),
    ("outputs", {"embedding": "embedding", "style": "style"}),  # style without its channels
    ("files", {"onnx": {"path": "/abs/model.onnx", "sha256": "0" * 64}}),
    ("files", {"onnx": {"path": "model.onnx", "sha256": "xyz"}}),
])
def test_invalid_values_are_refused(field, value):
    with pytest.raises(ValidationError):
        ModelCard.model_validate(card_dict(**{field: value}))


def test_sha_mismatch_is_detected(model_dir):
    (model_dir / "model.onnx").write_bytes(ONNX_BYTES[:-1] + b"?")
    with pytest.raises(ModelCardError, match="sha256"):
        ModelCard.load(model_dir)
    card = ModelCard.load(model_dir, verify=False)  # a caller may skip the check, then ask for it
    with pytest.raises(ModelCardError, match="does not match"):
        card.verify_files()


def test_missing_file_is_detected(model_dir):
    (model_dir / "model.onnx").unlink()
    with pytest.raises(ModelCardError, match="not found"):
        ModelCard.load(model_dir)


def test_card_without_folder_cannot_resolve_files():
    with pytest.raises(ModelCardError, match="not attached"):
        ModelCard.model_validate(card_dict()).onnx_path


def test_quality_mapping():
    card = ModelCard.model_validate(card_dict(quality={"method": "magface_linear", "low": 20.0, "high": 60.0}))
    norms = np.array([0.0, 20.0, 30.0, 40.0, 59.0, 60.0, 200.0])
    expected = [0.0, 0.0, 0.25, 0.5, 0.975, 1.0, 1.0]  # (n − 20)/40, clipped
    np.testing.assert_allclose(quality_from_magnitude(card, norms), expected, atol=1e-12)
    with pytest.raises(ModelCardError, match="no quality"):
        quality_from_magnitude(ModelCard.model_validate(card_dict(quality=None)), norms)


@pytest.mark.parametrize("far, used, threshold", [
    (1e-3, 1e-3, 0.3),
    (10 ** -3, 1e-3, 0.3),  # the same FAR computed differently
    (1e-2, 1e-2, 0.2),
    (5e-3, 1e-3, 0.3),  # not calibrated: the nearest stricter one
    (0.5, 1e-2, 0.2),
    (2e-4, 1e-4, 0.4),
])
def test_threshold_at(far, used, threshold):
    card = ModelCard.model_validate(card_dict())
    assert resolve_far(card, far) == used
    assert threshold_at(card, far) == threshold


def test_threshold_at_stricter_than_calibrated_fails_clearly():
    card = ModelCard.model_validate(card_dict())
    with pytest.raises(ModelCardError, match="calibrated FARs: 0.0001, 0.001, 0.01"):
        threshold_at(card, 1e-5)
    with pytest.raises(ModelCardError, match="no calibration"):
        threshold_at(ModelCard.model_validate(card_dict(calibration=None)), 1e-3)
    with pytest.raises(ModelCardError, match="in \\(0, 1\\)"):
        threshold_at(card, 0.0)


def test_calibration_must_be_consistent():
    base = card_dict()["calibration"]
    with pytest.raises(ValidationError, match="below the one at the looser FAR"):
        ModelCard.model_validate(card_dict(calibration={**base, "thresholds": {1e-2: 0.4, 1e-3: 0.3}}))
    with pytest.raises(ValidationError, match="cannot be measured on 300 impostor pairs"):
        ModelCard.model_validate(card_dict(calibration={**base, "negative_pairs": 300}))
    with pytest.raises(ValidationError, match="FAR must be in"):
        ModelCard.model_validate(card_dict(calibration={**base, "thresholds": {1.5: 0.1}}))


def test_version_2_calibration_and_fpir_thresholds():
    card = ModelCard.load(REPO / "models" / "default", verify=False)
    assert card.card_version == 2 and card.calibration.open_set is not None
    low, high = card.calibration.open_set.fpir_range
    sizes = [fpir_threshold(card, 0.01, n) for n in (10, 100, 1000, 100_000)]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1]  # a larger gallery needs a stricter threshold
    assert fpir_threshold(card, high, 1000) < fpir_threshold(card, low, 1000)
    with pytest.raises(ModelCardError, match=r"calibrated range \[0.001, 0.1\]"):
        fpir_threshold(card, low / 2, 1000)
    assert quality_band(card, 0.0) is card.calibration.quality_bands[0]
    assert quality_band(card, 1.0) is card.calibration.quality_bands[-1]


def test_version_1_card_serves_far_only():
    data = yaml.safe_load((REPO / "models" / "default" / "card.yaml").read_text())
    data["card_version"] = 1
    with pytest.raises(ValidationError, match="need card_version 2"):
        ModelCard.model_validate(data)
    for key in ("open_set", "quality_bands", "floors"):
        data["calibration"].pop(key)
    old = ModelCard.model_validate(data)
    assert threshold_at(old, 1e-3) == data["calibration"]["thresholds"][1e-3] and quality_band(old, 0.5) is None
    with pytest.raises(ModelCardError, match="no FPIR calibration"):
        fpir_threshold(old, 0.01, 100)
