import numpy as np

from engines.model_card import ModelCard, Quality
from engines.model_card import fpir_at, tail_threshold
from training.calibrate import calibrate, calibrate_floors, nonmated_maxima, pair_scores


def _card() -> ModelCard:
    return ModelCard.model_validate({
        "name": "t", "version": "1", "architecture": "x", "embedding_size": 2, "licence": "none",
        "files": {"onnx": {"path": "t.onnx", "sha256": "0" * 64}},
        "input": {"size": 112, "template": "arcface_112", "mean": [127.5] * 3, "std": [127.5] * 3},
        "provenance": {"source": "test"},
    })


def test_pair_scores_split_genuine_and_impostor():
    emb = np.array([[1, 0], [2, 0], [0, 1], [0, 3]], np.float64)
    genuine, impostor = pair_scores(emb, np.array([0, 0, 1, 1]))
    assert sorted(genuine) == [1.0, 1.0] and sorted(impostor) == [0.0] * 4


def test_thresholds_accept_at_most_far_of_impostors():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(300, 16)) + np.repeat(rng.normal(size=(100, 16)) * 2, 3, axis=0)  # 100 ids × 3
    labels = np.repeat(np.arange(100), 3)
    card = calibrate(_card(), emb, labels, "synthetic")
    genuine, impostor = pair_scores(emb, labels)
    assert card.calibration.negative_pairs == impostor.size == 300 * 299 // 2 - 300
    for far, t in card.calibration.thresholds.items():
        accepted = (impostor >= t).sum()
        assert accepted <= far * impostor.size
        assert (impostor >= np.nextafter(t, -1)).sum() > accepted or t == impostor.max()  # lowest such threshold
    norms = np.linalg.norm(emb, axis=1)
    assert np.isclose(card.quality.low, np.percentile(norms, 1)) and np.isclose(card.quality.high, np.percentile(norms, 99))



def test_an_existing_quality_mapping_is_kept_unless_asked():
    emb, labels = _identities()
    card = _card()
    card.quality = Quality(low=1.0, high=2.0)
    assert calibrate(card, emb, labels, "synthetic").quality == Quality(low=1.0, high=2.0)
    norms = np.linalg.norm(emb, axis=1)
    replaced = calibrate(card, emb, labels, "synthetic", set_quality=True).quality
    assert np.isclose(replaced.low, np.percentile(norms, 1)) and np.isclose(replaced.high, np.percentile(norms, 99))


def _identities(n_ids=150, per=3, seed=0):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_ids * per, 16)) + np.repeat(rng.normal(size=(n_ids, 16)) * 2, per, axis=0)
    return emb, np.repeat(np.arange(n_ids), per)


def test_open_set_tail_predicts_measured_fpir_and_grows_with_n():
    emb, labels = _identities()
    card = calibrate(_card(), emb, labels, "synthetic")
    open_set = card.calibration.open_set
    assert card.card_version == 2 and open_set.gallery_sizes[-1] == 149  # every other identity
    assert open_set.fpir_range[0] >= 0.001 and open_set.fpir_range[1] == 0.1
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    maxima = nonmated_maxima(unit, labels, 149, 1, np.random.default_rng(1))
    for fpir in (0.1, 0.03):
        t = tail_threshold(open_set, fpir, 149)
        assert 0.5 < np.mean(maxima >= t) / fpir < 2
        assert np.isclose(fpir_at(open_set, t, 149), fpir)
    assert tail_threshold(open_set, 0.01, 10) < tail_threshold(open_set, 0.01, 100) < tail_threshold(open_set, 0.01, 10_000)


def test_quality_bands_and_floor_from_error_versus_quality():
    emb, labels = _identities()
    card = calibrate(_card(), emb, labels, "synthetic")
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
