from __future__ import annotations

import numpy as np
import pytest

from training.eval.set_verification import IJB_FARS, fuse, magnitude_weighted, mean_of_normalised, template_scores, template_tar_at_far


def test_fusions_known_values():
    feats = np.array([[3.0, 0.0], [0.0, 2.0]])
    np.testing.assert_allclose(mean_of_normalised(feats), [0.5, 0.5])
    # weights ‖f‖ = 3 and 2: (3·[1,0] + 2·[0,1]) / 5
    np.testing.assert_allclose(magnitude_weighted(feats), [0.6, 0.4])


def test_fuse_groups_by_template():
    feats = np.array([[1.0, 0.0], [0.0, 5.0], [0.0, 1.0]])
    ids, fused = fuse(feats, ["b", "a", "b"], method="mean")
    assert ids.tolist() == ["a", "b"]
    np.testing.assert_allclose(fused, [[0.0, 1.0], [0.5, 0.5]])
    with pytest.raises(KeyError, match="unknown fusion"):
        fuse(feats, ["b", "a", "b"], method="median")


def _data(seed=0, n_templates=60, n_subjects=12, dim=16):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, n_subjects, n_templates)
    centers = rng.normal(size=(n_subjects, dim))
    feats = centers[labels] + rng.normal(scale=0.9, size=(n_templates, dim))
    return feats, np.arange(100, 100 + n_templates), labels


def _brute_scores(feats, ids, labels):
    scores, genuine = [], []
    for i in range(len(ids)):
        for j in range(i + 1, len(ids)):
            a, b = feats[i], feats[j]
            scores.append(float(a @ b / np.sqrt((a @ a) * (b @ b))))
            genuine.append(labels[i] == labels[j])
    return np.array(scores), np.array(genuine)


def _brute_tar(scores, genuine, far):
    imp, gen = scores[~genuine], scores[genuine]
    allowed = int(np.floor(far * len(imp) + 1e-9))
    for t in sorted(set(scores.tolist())) + [np.inf]:
        if np.count_nonzero(imp >= t) <= allowed:
            return np.count_nonzero(gen >= t) / len(gen)
    raise AssertionError("unreachable")


def test_all_vs_all_tar_at_far_against_brute_force():
    feats, ids, labels = _data()
    scores, genuine = _brute_scores(feats, ids, labels)
    result = template_tar_at_far(feats, ids, labels=labels)
    assert (result.n_genuine, result.n_impostors) == (genuine.sum(), (~genuine).sum())
    n_imp = (~genuine).sum()
    assert 1000 <= n_imp < 10000  # so 1e-3 … 1e-1 are resolvable and 1e-6 … 1e-4 are not
    np.testing.assert_array_equal(result.fars, IJB_FARS)
    assert np.all(np.isnan(result.tars[:3])) and len(result.notes) == 3
    for far, tar in zip(result.fars[3:], result.tars[3:]):
        assert tar == _brute_tar(scores, genuine, far)


def test_pair_list_scores():
    feats, ids, labels = _data(seed=1, n_templates=10)
    pairs = [(105, 101, True), (100, 109, False), (103, 103, True)]
    scores, genuine = template_scores(feats, ids, pairs=pairs)
    rows = {100 + k: feats[k] for k in range(10)}
    want = [rows[a] @ rows[b] / np.linalg.norm(rows[a]) / np.linalg.norm(rows[b]) for a, b, _ in pairs]
    np.testing.assert_allclose(scores, want, rtol=1e-12)
    assert genuine.tolist() == [True, False, True]
    with pytest.raises(KeyError, match="999"):
        template_scores(feats, ids, pairs=[(100, 999, False)])
    with pytest.raises(ValueError, match="labels"):
        template_scores(feats, ids)
