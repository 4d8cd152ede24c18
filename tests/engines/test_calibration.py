"""engines.calibration: thresholds, the open-set tail, quality only where an error-versus-reject check validates it,
and `faceset model calibrate` end to end without torch."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from engines.calibration import QUALITY_MIN_GAIN, calibrate, calibrate_floors, check_quality, pair_scores
from engines.model_card import ModelCard, Quality
from tests.helpers import REPO


def _card(magface: bool = False) -> ModelCard:
    return ModelCard.model_validate({
        "name": "t", "version": "1", "architecture": "x", "embedding_size": 16, "licence": "none",
        "files": {"onnx": {"path": "t.onnx", "sha256": "0" * 64}},
        "input": {"size": 112, "template": "arcface_112", "mean": [127.5] * 3, "std": [127.5] * 3},
        "provenance": {"source": "test"},
        "magnitude": {"l_a": 10.0, "u_a": 110.0} if magface else None,
    })


def _identities(n_ids=150, per=3, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_ids * per, 16)) + np.repeat(rng.normal(size=(n_ids, 16)) * 2, per, axis=0)
    return emb, np.repeat(np.arange(n_ids), per)


def _degraded(norm_tracks_degradation: bool, n_ids=150, per=6, seed=0):
    """Faces of n_ids identities whose direction drifts from their identity's with a per-face degradation d in
    [0, 1]; the norm falls with d (MagFace-like: ‖f‖ from 50 down to 20) or is drawn independently of it."""
    rng = np.random.default_rng(seed)
    d = rng.uniform(0, 1, n_ids * per)
    direction = np.repeat(rng.normal(size=(n_ids, 16)), per, axis=0) + rng.normal(size=(n_ids * per, 16)) * d[:, None]
    norm = 50 - 30 * d if norm_tracks_degradation else rng.uniform(20, 50, d.size)
    return direction / np.linalg.norm(direction, axis=1, keepdims=True) * norm[:, None], np.repeat(np.arange(n_ids), per)


def test_pair_scores_split_genuine_and_impostor():
    emb = np.array([[1, 0], [2, 0], [0, 1], [0, 3]], np.float64)
    genuine, impostor = pair_scores(emb, np.array([0, 0, 1, 1]))
    assert sorted(genuine) == [1.0, 1.0] and sorted(impostor) == [0.0] * 4


def test_thresholds_accept_at_most_far_of_impostors():
    emb, labels = _identities(100)
    card = calibrate(_card(), emb, labels, "synthetic")
    genuine, impostor = pair_scores(emb, labels)
    assert card.calibration.negative_pairs == impostor.size == 300 * 299 // 2 - 300
    assert card.calibration.positive_pairs == genuine.size == 300
    for far, t in card.calibration.thresholds.items():
        accepted = (impostor >= t).sum()
        assert accepted <= far * impostor.size
        assert (impostor >= np.nextafter(t, -1)).sum() > accepted or t == impostor.max()  # lowest such threshold


def test_a_magface_magnitude_that_predicts_errors_is_the_quality():
    emb, labels = _degraded(norm_tracks_degradation=True)
    card = calibrate(_card(magface=True), emb, labels, "synthetic")
    (check,) = card.calibration.quality_checks
    assert check.source == "magnitude" and check.used and check.reject == [0.0, 0.1, 0.2]
    assert check.fnmr[0] > 0.05 and check.fnmr[2] < (1 - QUALITY_MIN_GAIN) * check.fnmr[0]
    norms = np.linalg.norm(emb, axis=1)
    assert np.isclose(card.quality.low, np.percentile(norms, 1)) and np.isclose(card.quality.high, np.percentile(norms, 99))
    assert card.calibration.quality_bands and card.calibration.floors is not None
    ModelCard.model_validate(card.model_dump())  # the card as written validates


def test_a_magnitude_unrelated_to_errors_gives_no_quality():
    """The same faces, the norm drawn at random: rejecting the 'worst' faces does not lower FNMR, so no quality."""
    emb, labels = _degraded(norm_tracks_degradation=False)
    magface = _card(magface=True)
    magface.quality = Quality(low=20.0, high=50.0)  # a mapping the card had: it goes too
    card = calibrate(magface, emb, labels, "synthetic")
    (check,) = card.calibration.quality_checks
    assert not check.used and check.fnmr[2] > (1 - QUALITY_MIN_GAIN) * check.fnmr[0]
    assert card.quality is None and card.calibration.quality_bands == [] and card.calibration.floors is None
    ModelCard.model_validate(card.model_dump())


def test_a_plain_model_norm_is_never_a_quality():
    """Not trained with MagFace (no magnitude section): its norm is no candidate, however it behaves."""
    emb, labels = _degraded(norm_tracks_degradation=True)
    card = calibrate(_card(), emb, labels, "synthetic")
    assert card.quality is None and card.calibration.quality_checks == [] and card.calibration.floors is None


def test_an_existing_quality_mapping_is_kept_unless_asked():
    emb, labels = _degraded(norm_tracks_degradation=True)
    card = _card(magface=True)
    card.quality = Quality(low=19.0, high=51.0)
    assert calibrate(card, emb, labels, "synthetic").quality == Quality(low=19.0, high=51.0)
    norms = np.linalg.norm(emb, axis=1)
    replaced = calibrate(card, emb, labels, "synthetic", set_quality=True).quality
    assert np.isclose(replaced.low, np.percentile(norms, 1)) and np.isclose(replaced.high, np.percentile(norms, 99))


def test_check_quality_on_hand_made_pairs():
    """Ten genuine pairs, one failing (-0.2, quality 0) and nine passing (0.9, quality 1), and 30 impostors from -0.5
    to 0 at quality 0.5. At FMR 0.05 one impostor may pass, so the threshold sits just above the second best
    (≈ -0.017): FNMR 1/10. Rejecting 10 % (4 pairs: the failing one, then 3 impostors) leaves no error."""
    genuine, gq = np.array([-0.2] + [0.9] * 9), np.array([0.0] + [1.0] * 9)
    impostor, iq = np.linspace(-0.5, 0.0, 30), np.full(30, 0.5)
    check = check_quality("magnitude", genuine, impostor, gq, iq, fmr=0.05)
    assert check.fnmr == [0.1, 0.0, 0.0] and check.used
    # the wrong way round: rejecting the 'worst' drops good pairs (4 of them, then 8): FNMR 1/6, then 1/2
    reversed_ = check_quality("magnitude", genuine, impostor, 1 - gq, iq, fmr=0.05)
    assert reversed_.fnmr == pytest.approx([0.1, 1 / 6, 0.5]) and not reversed_.used


def test_quality_bands_and_floor_from_error_versus_quality():
    emb, labels = _degraded(norm_tracks_degradation=True)
    card = calibrate(_card(magface=True), emb, labels, "synthetic")
    bands = card.calibration.quality_bands
    assert bands[0].low == 0 and bands[-1].high == 1 and all(a.high == b.low for a, b in zip(bands, bands[1:]))
    assert sum(b.negative_pairs for b in bands) == card.calibration.negative_pairs
    # genuine pairs of lower quality < 0.2 fail the threshold, the rest pass half the time: the floor is 0.2
    gq = np.linspace(0, 1, 2000, endpoint=False)
    genuine = np.where(gq < 0.2, 0.0, np.tile([0.0, 1.0], 1000))
    floors = calibrate_floors(genuine, gq, threshold=0.5)
    assert abs(floors.probe - 0.2) < 1e-3 and floors.enrolment == floors.probe  # both ratios: a clear climb
    # a milder climb (errors 1.4 x the plateau) is a probe floor but turns no enrolment away
    mild = np.where(gq < 0.2, np.tile([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0], 200), np.tile([0.0, 1.0], 1000))
    floors = calibrate_floors(mild, gq, threshold=0.5)
    assert abs(floors.probe - 0.2) < 1e-3 and floors.enrolment == 0
    # 30 % of the pairs clipped to quality 0, all failing: their tied bins merge into one and the floor lies above 0
    gq = np.concatenate([np.zeros(600), np.linspace(0.3, 1, 1400)])
    floors = calibrate_floors(np.where(gq == 0, 0.0, np.tile([0.0, 1.0], 1000)), gq, threshold=0.5)
    assert 0 < floors.probe <= 0.3 and floors.enrolment == floors.probe and "nan" not in floors.rule


# ---- faceset model calibrate, torch-free ----------------------------------------------------------------------------

NO_TORCH = """
import sys
import traceback


class NoTorch:  # as in an install without torch: importing it fails (sys.modules["torch"] = None trips scipy)
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "torch":
            raise ModuleNotFoundError("No module named 'torch'")


sys.meta_path.insert(0, NoTorch())
from typer.testing import CliRunner
from service.cli import build_app
result = CliRunner().invoke(build_app(), ["model", "calibrate", *sys.argv[1:]])
if result.exit_code:
    traceback.print_exception(*result.exc_info)
    sys.exit(result.output + f"exit {result.exit_code}")
assert "torch" not in sys.modules
print(result.output)
"""


@pytest.fixture(scope="module")
def holdout(data_dir, tmp_path_factory):
    """A tiny hold-out: three photos each of the first eight identities with three or more of the CelebA calibration
    hold-out (engines.holdout over CelebA-10k, CelebA-299's people protected, as benchmarks/open_set.py picks it),
    a folder each: calibration never reads an evaluation set, even for a test card."""
    from engines.holdout import holdout_names, list_identities

    ids = list_identities(data_dir / "celeba-10k-aligned")
    names = sorted(holdout_names(ids, protected=list_identities(data_dir / "celeba-299"), every=3, min_images=2))
    root = tmp_path_factory.mktemp("holdout")
    for name in [n for n in names if len(ids[n]) >= 3][:8]:
        (root / name).mkdir()
        for p in ids[name][:3]:
            (root / name / p.name).symlink_to(p)
    return root


def _run(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-c", NO_TORCH, *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.mark.data
def test_model_calibrate_runs_without_torch_on_photos_and_crops(anchors_dir, holdout, tmp_path):
    """mobilefacenet-a (not a MagFace model) imported as a user would, then calibrated through the pipeline and from
    aligned crops in a process where torch cannot be imported: thresholds, pairs, the tail model, a null quality."""
    from typer.testing import CliRunner

    from engines.base import build_engine
    from engines.detection import build_detector
    from engines.pipeline import FacePipeline
    from service.cli import build_app

    folder = tmp_path / "model"
    imported = CliRunner().invoke(build_app(), ["model", "import", str(anchors_dir / "mobilefacenet-a.onnx"), "--out",
                                                str(folder), "--channel-order", "BGR", "--std", "128"])
    assert imported.exit_code == 0, imported.output
    before = ModelCard.load(folder)
    before.quality = Quality(low=5.0, high=15.0)  # a mapping from the norms' spread, as calibration used to invent
    before.save(folder)
    out = _run(folder, "--holdout", holdout, "--dataset", "CelebA hold-out people (test)", "--threads", "1").stdout
    card = ModelCard.load(folder)
    c = card.calibration
    assert c.positive_pairs + c.negative_pairs == 24 * 23 // 2 and c.positive_pairs == 8 * 3  # every face found
    assert list(c.thresholds) == [0.01] and c.open_set is not None and c.dataset == "CelebA hold-out people (test)"
    assert card.quality is None and c.quality_checks == [] and c.quality_bands == [] and c.floors is None
    assert "quality gating is off" in out and "raw hold-out photos through the serving pipeline" in c.method
    assert (card.files, card.input) == (before.files, before.input)  # the model itself untouched

    pipeline = FacePipeline(build_detector("mtcnn", intra_op_threads=1), build_engine("onnxruntime", card=card), card)
    crops = tmp_path / "crops"
    for person in sorted(holdout.iterdir()):
        (crops / person.name).mkdir(parents=True)
        for p in sorted(person.iterdir()):
            image = np.asarray(Image.open(p).convert("RGB"))
            Image.fromarray(pipeline.align(image, pipeline.detect(image, 1))[0]).save(crops / person.name / f"{p.stem}.png")
    _run(folder, "--holdout", crops, "--aligned", "--threads", "1")
    aligned = ModelCard.load(folder).calibration
    assert (aligned.positive_pairs, aligned.negative_pairs) == (c.positive_pairs, c.negative_pairs)
    assert "aligned hold-out crops" in aligned.method
    assert aligned.thresholds[0.01] == pytest.approx(c.thresholds[0.01], abs=1e-6)  # the same crops (PNG is lossless)
    assert sorted(p.name for p in folder.iterdir()) == ["card.yaml", "mobilefacenet-a.onnx"]  # no temp file left


@pytest.mark.data
def test_model_calibrate_takes_cached_pipeline_embeddings(anchors_dir, tmp_path):
    """--embeddings (the .npz benchmarks/open_set.py caches): rows without a face (NaN) are left out and counted."""
    from typer.testing import CliRunner

    from service.cli import build_app

    folder = tmp_path / "model"
    imported = CliRunner().invoke(build_app(), ["model", "import", str(anchors_dir / "mobilefacenet-a.onnx"), "--out",
                                                str(folder), "--channel-order", "BGR", "--std", "128"])
    assert imported.exit_code == 0, imported.output
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(60, 128)) + np.repeat(rng.normal(size=(20, 128)) * 2, 3, axis=0)
    emb[0] = np.nan  # a photo without a face
    npz = tmp_path / "holdout.npz"
    np.savez(npz, embedding=emb.astype(np.float32), identity=np.repeat([f"p{i:02d}" for i in range(20)], 3))
    _run(folder, "--embeddings", npz, "--dataset", "synthetic (test)")
    c = ModelCard.load(folder).calibration
    genuine = 1 + 19 * 3  # the first person keeps two faces
    assert (c.positive_pairs, c.negative_pairs) == (genuine, 59 * 58 // 2 - genuine)
    assert c.dataset == "synthetic (test)" and "1 photos without a face left out" in c.method
    # the command as run, recorded in the calibration section
    assert c.command == f"faceset model calibrate {folder} --embeddings {npz} --dataset 'synthetic (test)'"
