"""training.caface.quality_head: a learned per-face quality for a model we did not train: its CR-FIQA target, the
exported head against torch, and, on the anchor mobilefacenet-a, train -> calibrate -> /embed reports its quality."""
from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from typer.testing import CliRunner

from engines.base import EMBEDDING, STYLE, build_engine, run_aligned
from engines.calibration import calibrate_folder
from engines.detection import build_detector
from engines.model_card import ModelCard, Quality
from engines.pipeline import FacePipeline
from engines.quality_sources import HEAD_INPUTS, HEAD_OUTPUT
from service.app import create_app
from tests.helpers import anchor_card, drop_keys, make_settings
from training.caface.quality_head import EPS, Frames, cr_targets, export_head, predict, train_head
from training.cli import model_fuse_app


def test_cr_target_follows_its_formula_on_known_values():
    """CR = CCS / (NNCCS + 1 + ε): CCS to the own class centre without the face's own photo, NNCCS to the nearest
    other class centre; a class of one photo gives no target."""
    e = np.eye(3)
    s = 1 / math.sqrt(2)
    clean = np.array([e[0], e[1], e[2], e[2], [s, s, 0]])  # class 0: A, B; class 1: C, D; class 2: E alone
    poor = np.array([[s, s, 0], e[0], e[2], e[1], e[0]])  # a second variant of each photo
    features = np.stack([clean, poor], axis=1) * 7.0  # (5, 2, 3): the norm plays no part
    cr = cr_targets(features, np.array([0, 0, 1, 1, 2]))
    # A's poor frame [s, s, 0]: own centre without A is B = e1 (cos s); other centres e2 (0) and E (1)
    assert cr[0, 1] == pytest.approx(s / (1 + 1 + EPS))
    # A's clean frame e0: cos 0 to B; nearest other centre E (cos s)
    assert cr[0, 0] == pytest.approx(0.0)
    # C's clean frame e2: own centre D = e2 (cos 1); other centres (e0 + e1)/√2 and E: both cos 0
    assert cr[2, 0] == pytest.approx(1 / (0 + 1 + EPS))
    assert np.isnan(cr[4]).all()


def synthetic_frames(n: int = 400, width: int = 12, seed: int = 0) -> Frames:
    """Style whose first column carries the target (plus noise), magnitudes on a model's scale."""
    rng = np.random.default_rng(seed)
    target = rng.uniform(0.1, 0.6, n)
    style = rng.normal(size=(n, width))
    style[:, 0] = 5 * target + 0.05 * rng.normal(size=n)
    return Frames(style.astype(np.float32), rng.uniform(8, 20, n).astype(np.float32), target.astype(np.float32))


def test_the_exported_head_computes_what_torch_computes_and_learns_the_target(tmp_path):
    frames = synthetic_frames()
    net = train_head(frames, steps=300, seed=0)
    check = synthetic_frames(seed=1)
    assert np.corrcoef(predict(net, check), check.target)[0, 1] > 0.9  # unseen frames: the head learned it
    diff = export_head(net, tmp_path / "head.onnx", frames)
    assert diff <= 1e-4 and sorted(p.name for p in tmp_path.iterdir()) == ["head.onnx"]  # no temp file left
    session = ort.InferenceSession(str(tmp_path / "head.onnx"), providers=["CPUExecutionProvider"])
    got = session.run([HEAD_OUTPUT], {HEAD_INPUTS[0]: check.style, HEAD_INPUTS[1]: check.magnitude[:, None]})[0]
    np.testing.assert_allclose(got[:, 0], predict(net, check), atol=1e-4)  # a batch of another size too


def _tree(root: Path, ids: dict[str, list[Path]], photos: int) -> Path:
    for name, paths in ids.items():
        (root / name).mkdir(parents=True)
        for p in paths[:photos]:
            (root / name / p.name).symlink_to(p)
    return root


@pytest.fixture(scope="module")
def people(data_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(training people, calibration hold-out people) of CelebA-10k, split as engines.holdout splits it (CelebA-299's
    people protected): eight of each with three photos or more; the head never sees the hold-out."""
    from engines.holdout import holdout_names, list_identities

    ids = list_identities(data_dir / "celeba-10k-aligned")
    protected = list_identities(data_dir / "celeba-299")
    held = holdout_names(ids, protected=protected, every=3, min_images=2)
    train = [n for n in sorted(ids) if n not in held and n not in protected and len(ids[n]) >= 3][:8]
    calib = [n for n in sorted(held) if len(ids[n]) >= 3][:8]
    root = tmp_path_factory.mktemp("people")
    return (_tree(root / "train", {n: ids[n] for n in train}, 4), _tree(root / "holdout", {n: ids[n] for n in calib}, 3))


@pytest.mark.data
@pytest.mark.slow
def test_an_imported_model_gets_a_head_calibration_checks_it_and_embed_reports_its_quality(
        anchors_dir, data_dir, people, tmp_path):
    train, holdout = people
    model = anchor_card(anchors_dir, tmp_path / "model")
    runner = CliRunner()
    for args in (["style", str(model)],
                 ["quality-head", str(model), "--data", str(train), "--work", str(tmp_path / "work"), "--steps", "200",
                  "--eval-every", "4"]):
        done = runner.invoke(model_fuse_app, args)
        assert done.exit_code == 0, done.output
    card = ModelCard.load(model)  # verifies the head's sha256 too
    assert card.quality_head.parity_max_abs_diff <= 1e-4 and card.quality is None
    assert "quality-head" in card.quality_head.command and "--steps 200" in card.quality_head.command

    card = calibrate_folder(model / "card.yaml", holdout, "CelebA hold-out people (test)", threads=1)
    (check,) = card.calibration.quality_checks  # a plain ONNX: its norm is no candidate, the head is
    assert check.source == "learned_head" and check.genuine_pairs == 8 * 3
    assert check.used == (check.fnmr[0] > 0 and check.fnmr[-1] <= (1 - check.min_gain) * check.fnmr[0])
    assert (card.quality is not None) == check.used
    if card.quality is None:  # refused on 24 genuine pairs: the service's path is checked with a stated mapping
        data = card.model_dump()
        data["calibration"]["quality_checks"] = []  # a stated mapping, not a validated one
        card = ModelCard.model_validate({**data, "quality": Quality(method="learned_head", low=0.0, high=1.0).model_dump()})
        card.save(model)

    photo = sorted(next(holdout.iterdir()).iterdir())[0]
    image = np.asarray(Image.open(photo).convert("RGB"))
    pipeline = FacePipeline(build_detector("mtcnn", intra_op_threads=1), build_engine("onnxruntime", card=card), card)
    out = run_aligned(pipeline.engine, card, pipeline.align(image, pipeline.detect(image, 1)))
    head = ort.InferenceSession(str(model / card.quality_head.onnx.path), providers=["CPUExecutionProvider"])
    score = head.run([HEAD_OUTPUT], {HEAD_INPUTS[0]: out[STYLE],
                                     HEAD_INPUTS[1]: np.linalg.norm(out[EMBEDDING], axis=1, keepdims=True)})[0][0, 0]
    expected = float(np.clip((score - card.quality.low) / (card.quality.high - card.quality.low), 0, 1))

    settings = make_settings(model_card=model, fusion_card="none")
    try:
        with TestClient(create_app(settings)) as client:
            faces = client.post("/embed?max_faces=1", files={"images": photo.read_bytes()}).json()["results"][0]["faces"]
            blank = io.BytesIO()
            Image.new("RGB", (96, 96), (128, 128, 128)).save(blank, format="PNG")
            nobody = client.post("/embed", files={"images": blank.getvalue()})  # no face: no rows for the head
            assert nobody.status_code == 200 and nobody.json()["results"][0]["faces"] == [], nobody.text
    finally:
        drop_keys(settings)
    assert faces[0]["quality"] == pytest.approx(expected, abs=1e-4)
