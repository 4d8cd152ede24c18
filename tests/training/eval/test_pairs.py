from __future__ import annotations

import numpy as np
import pytest

from training.eval.pairs import (
    accuracy_at,
    balanced_folds,
    best_threshold,
    cosine_similarity,
    evaluate_pairs,
    kfold_accuracy,
    read_pairs,
    roc_curve,
    tar_at_far,
    threshold_at_far,
)

# Sorted by score the labels read F F T F F T T T: rejecting the lowest five leaves one error (0.3),
# every other cut leaves at least two, so the threshold lies between 0.5 and 0.6 and accuracy is 7/8.
HAND_SCORES = np.array([0.7, 0.1, 0.5, 0.3, 0.8, 0.2, 0.6, 0.4])
HAND_SAME = np.array([True, False, False, True, True, False, True, False])


def test_best_threshold_hand_derived():
    t, acc = best_threshold(HAND_SCORES, HAND_SAME)
    assert t == pytest.approx(0.55)
    assert acc == 7 / 8
    assert accuracy_at(HAND_SCORES, HAND_SAME, t) == 7 / 8


def test_best_threshold_ties_pick_lowest():
    # cuts after 0.1 (t 0.15) and after 0.3 (t 0.35) both give 3/4
    t, acc = best_threshold([0.1, 0.2, 0.3, 0.4], [False, True, False, True])
    assert (t, acc) == (pytest.approx(0.15), 0.75)


def test_best_threshold_never_splits_tied_scores():
    # the three 0.5 scores must fall on one side; the best is accepting only 0.9: 3/4
    t, acc = best_threshold([0.5, 0.5, 0.5, 0.9], [True, False, False, True])
    assert t == pytest.approx(0.7) and acc == 0.75


def test_cosine_similarity_against_loop():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(7, 5)) * 3, rng.normal(size=(7, 5))
    want = [float(x @ y / np.sqrt((x @ x) * (y @ y))) for x, y in zip(a, b)]
    np.testing.assert_allclose(cosine_similarity(a, b), want, rtol=1e-12)


def test_balanced_folds_keep_balance_and_order():
    issame = np.array([True] * 300 + [False] * 300)
    folds = balanced_folds(issame, 10)
    for k in range(10):
        assert (issame[folds == k]).sum() == 30 and (~issame[folds == k]).sum() == 30
    assert np.all(np.diff(folds[:300]) >= 0) and np.all(np.diff(folds[300:]) >= 0)
    with pytest.raises(ValueError):
        balanced_folds(np.array([True, False] * 3), 10)


def _brute_best(scores, issame):
    """Every distinct cut, tried one by one in ascending order; first best wins."""
    u = sorted(set(scores.tolist()))
    candidates = [u[0]] + [(a + b) / 2 for a, b in zip(u[:-1], u[1:])] + [np.nextafter(u[-1], np.inf)]
    best_t, best_acc = None, -1.0
    for t in candidates:
        acc = sum((s >= t) == y for s, y in zip(scores, issame)) / len(scores)
        if acc > best_acc:
            best_t, best_acc = t, acc
    return best_t


def _brute_kfold(scores, issame, folds):
    accs, ts = [], []
    for k in sorted(set(folds.tolist())):
        train, test = folds != k, folds == k
        t = _brute_best(scores[train], issame[train])
        ts.append(t)
        accs.append(sum((s >= t) == y for s, y in zip(scores[test], issame[test])) / test.sum())
    return np.array(accs), np.array(ts)


@pytest.mark.parametrize("official", [False, True])
def test_kfold_against_brute_force(official):
    rng = np.random.default_rng(7)
    issame = np.array([True] * 60 + [False] * 60)
    # rounded to two decimals so that ties occur; the distributions overlap so thresholds matter
    scores = np.round(np.where(issame, rng.normal(0.45, 0.2, 120), rng.normal(0.15, 0.2, 120)), 2)
    folds = rng.integers(0, 4, 120) if official else None
    result = kfold_accuracy(scores, issame, folds, n_folds=10)
    used = folds if official else balanced_folds(issame, 10)
    np.testing.assert_array_equal(result.folds, used)
    accs, ts = _brute_kfold(scores, issame, used)
    np.testing.assert_array_equal(result.accuracies, accs)
    np.testing.assert_allclose(result.thresholds, ts, rtol=0, atol=1e-12)
    assert result.mean == pytest.approx(accs.mean()) and result.std == pytest.approx(accs.std())
    assert len(result.accuracies) == (4 if official else 10)


def test_single_official_fold_is_split():
    issame = np.array([True] * 30 + [False] * 30)
    scores = np.linspace(0, 1, 60)
    result = kfold_accuracy(scores, issame, np.zeros(60, dtype=int), n_folds=5)
    assert len(result.accuracies) == 5


def test_threshold_at_far_on_uniform_impostors():
    rng = np.random.default_rng(3)
    imp = rng.permutation(np.arange(1000) / 1000)  # 0.000 … 0.999
    for far, k in [(1e-1, 100), (1e-2, 10), (1e-3, 1), (1e-4, 0)]:
        t = threshold_at_far(imp, far)
        assert (imp >= t).sum() == k
        # the lowest such threshold: one step down accepts one impostor too many
        assert (imp >= np.nextafter(t, -np.inf)).sum() == k + 1
    assert threshold_at_far(imp, 1e-2) == pytest.approx(0.989, abs=1e-12)


def test_threshold_at_far_counts_and_ties():
    # 1e-3·3000 must allow exactly 3 false accepts despite floating point
    imp = np.arange(3000) / 3000
    assert (imp >= threshold_at_far(imp, 1e-3)).sum() == 3
    # three tied top impostors cannot be split: allowing 2 accepts none
    imp = np.concatenate([[0.9, 0.9, 0.9], np.linspace(0, 0.5, 97)])
    t = threshold_at_far(imp, 0.02)
    assert (imp >= t).sum() == 0 and t > 0.9
    assert threshold_at_far(imp, 1.0) == imp.min()


def _brute_tar(gen, imp, far):
    allowed = int(np.floor(far * len(imp) + 1e-9))
    for t in sorted(set(np.concatenate([gen, imp]).tolist())) + [np.inf]:
        if sum(s >= t for s in imp) <= allowed:
            return sum(s >= t for s in gen) / len(gen)
    raise AssertionError("unreachable")


def test_tar_at_far_against_brute_force():
    rng = np.random.default_rng(11)
    gen, imp = rng.normal(0.5, 0.2, 200), rng.normal(0.0, 0.2, 500)
    scores, issame = np.concatenate([gen, imp]), np.array([True] * 200 + [False] * 500)
    result = tar_at_far(scores, issame, fars=(1e-3, 1e-2, 5e-2, 1e-1))
    assert np.isnan(result.tars[0]) and not result.resolvable[0] and len(result.notes) == 1
    for far, tar in zip(result.fars[1:], result.tars[1:]):
        assert tar == _brute_tar(gen, imp, far)


def test_roc_curve_against_counts():
    rng = np.random.default_rng(5)
    scores = np.round(rng.normal(size=80), 1)
    issame = rng.random(80) < 0.4
    far, tar, thresholds = roc_curve(scores, issame)
    assert (far[0], tar[0], far[-1], tar[-1]) == (0.0, 0.0, 1.0, 1.0)
    for f, r, t in zip(far, tar, thresholds):
        assert f == np.mean(scores[~issame] >= t) and r == np.mean(scores[issame] >= t)
    assert np.all(np.diff(thresholds) < 0)


def test_evaluate_pairs_from_embeddings():
    # embeddings at the hand-constructed cosines, with arbitrary magnitudes that must not matter
    rng = np.random.default_rng(2)
    angles = np.arccos(HAND_SCORES)
    emb_a = np.stack([np.ones(8), np.zeros(8), np.zeros(8)], 1) * rng.uniform(0.5, 9, (8, 1))
    emb_b = np.stack([np.cos(angles), np.sin(angles), np.zeros(8)], 1) * rng.uniform(0.5, 9, (8, 1))
    report = evaluate_pairs(emb_a, emb_b, HAND_SAME, n_folds=2, fars=(0.25,))
    assert report.best_threshold == pytest.approx(0.55) and report.best_accuracy == 7 / 8
    # impostors 0.5, 0.4, 0.2, 0.1: FAR 1/4 accepts only 0.5, so genuine 0.6, 0.7, 0.8 pass, 0.3 fails
    assert report.tar_at_far.tars[0] == 0.75
    assert set(report.summary()) >= {"accuracy_mean", "accuracy_std", "fold_thresholds", "tar_at_far"}


def test_read_pairs_nested_layout(tmp_path):
    images = tmp_path / "lfw"
    for name in ("Ann", "Bob"):
        (images / name).mkdir(parents=True)
    text = "2\t1\nAnn\t1\t2\nAnn\t1\tBob\t3\nBob\t1\t2\nBob\t2\tAnn\t4\n"
    (tmp_path / "pairs.txt").write_text(text)
    pairs = read_pairs(tmp_path / "pairs.txt", images)
    assert [(p.path_a.relative_to(images).as_posix(), p.path_b.relative_to(images).as_posix(), p.issame, p.fold) for p in pairs] == [
        ("Ann/Ann_0001.jpg", "Ann/Ann_0002.jpg", True, 0),
        ("Ann/Ann_0001.jpg", "Bob/Bob_0003.jpg", False, 0),
        ("Bob/Bob_0001.jpg", "Bob/Bob_0002.jpg", True, 1),
        ("Bob/Bob_0002.jpg", "Ann/Ann_0004.jpg", False, 1),
    ]


def test_read_pairs_rejects_malformed(tmp_path):
    bad = tmp_path / "pairs.txt"
    bad.write_text("1\t1\nAnn\t1\tBob\t2\nAnn\t1\t2\n")  # different line where a same line belongs
    with pytest.raises(ValueError, match="line 2"):
        read_pairs(bad, tmp_path)
    bad.write_text("1\t2\nAnn\t1\t2\n")
    with pytest.raises(ValueError, match="promises"):
        read_pairs(bad, tmp_path)


@pytest.mark.data
def test_read_real_lfw_dev_pairs(data_dir):
    root = data_dir / "lfw-dev"
    pairs = read_pairs(root / "pairs.txt", root / "images")
    assert len(pairs) == 600
    assert sum(p.issame for p in pairs) == 300
    assert {p.fold for p in pairs} == {0}
    assert pairs[0].path_a == root / "images" / "Abel_Pacheco_0001.jpg"
    assert pairs[0].path_b == root / "images" / "Abel_Pacheco_0004.jpg"
    missing = [str(p) for pair in pairs for p in pair[:2] if not p.is_file()]
    assert not missing, missing[:5]
    folds = balanced_folds(np.array([p.issame for p in pairs]), 10)
    assert np.bincount(folds).tolist() == [60] * 10
