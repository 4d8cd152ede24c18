import numpy as np

from engines.model_card import ModelCard
from training.calibrate import calibrate, pair_scores


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
