from __future__ import annotations

import numpy as np
import pytest

from training.eval.quality import (
    REJECT_FRACTIONS,
    area_under_erc,
    erc_from_embeddings,
    error_versus_reject,
    magnitudes,
    pair_quality,
)

# (score, quality, genuine). At FMR 0.25 with all four impostors one may pass: the threshold sits
# just above 0.3, so genuine 0.35 and 0.7 pass and 0.05, 0.15, 0.25 fail: FNMR 3/5.
# Rejecting half (⌊0.5·9⌋ = 4 pairs: qualities 1, 1.5, 2, 3) keeps impostors 0.2, 0.1 and genuine
# 0.35, 0.7, 0.25. Recomputed on the kept impostors (⌊0.25·2⌋ = 0 may pass) the threshold is just
# above 0.2: FNMR 0. Fixed on all pairs it stays above 0.3: 0.25 fails, FNMR 1/3.
HAND = [
    (0.4, 1.5, False), (0.3, 3.0, False), (0.2, 10.0, False), (0.1, 10.0, False),
    (0.05, 1.0, True), (0.15, 2.0, True), (0.25, 9.5, True), (0.35, 9.0, True), (0.7, 9.0, True),
]


def _hand(fixed):
    s, q, y = (np.array(c) for c in zip(*HAND))
    return error_versus_reject(s, y, q, fmr=0.25, reject=np.array([0.0, 0.5]), fixed_threshold=fixed)


def test_erc_hand_derived_recomputed_threshold():
    erc = _hand(fixed=False)
    np.testing.assert_allclose(erc.fnmr, [0.6, 0.0])
    assert erc.n_kept.tolist() == [9, 5]
    assert erc.fmr_resolvable.tolist() == [True, False]
    assert 0.3 < erc.thresholds[0] < 0.31 and 0.2 < erc.thresholds[1] < 0.21
    assert erc.auc == pytest.approx(0.5 * (0.6 + 0.0) / 2)


def test_erc_hand_derived_fixed_threshold():
    erc = _hand(fixed=True)
    np.testing.assert_allclose(erc.fnmr, [0.6, 1 / 3])
    assert erc.thresholds[0] == erc.thresholds[1]


def test_reject_fractions_and_area():
    np.testing.assert_allclose(REJECT_FRACTIONS, np.arange(20) * 0.05)
    assert REJECT_FRACTIONS[-1] == 0.95
    # a line from 1 to 0 over [0, 1] has area 1/2
    assert area_under_erc([0.0, 0.5, 1.0], [1.0, 0.5, 0.0]) == pytest.approx(0.5)


def _synthetic(seed=0, n_gen=3000, n_imp=20000):
    """Genuine scores rise with quality; impostor scores do not depend on it."""
    rng = np.random.default_rng(seed)
    q = rng.uniform(0, 1, n_gen + n_imp)
    issame = np.arange(n_gen + n_imp) < n_gen
    scores = np.where(issame, 0.2 + 0.5 * q + rng.normal(0, 0.08, q.size), rng.normal(0, 0.1, q.size))
    return scores, issame, q, rng.permutation(q)


@pytest.mark.parametrize("fixed", [False, True])
def test_erc_falls_with_informative_quality_not_with_random(fixed):
    scores, issame, q_good, q_random = _synthetic()
    good = error_versus_reject(scores, issame, q_good, fixed_threshold=fixed)
    rand = error_versus_reject(scores, issame, q_random, fixed_threshold=fixed)
    assert good.fnmr[0] == rand.fnmr[0] > 0.1  # nothing rejected yet: the same pairs
    half = int(np.argmin(np.abs(REJECT_FRACTIONS - 0.5)))
    assert good.fnmr[half] < 0.2 * good.fnmr[0]
    assert np.max(np.abs(rand.fnmr[: half + 1] - rand.fnmr[0])) < 0.04
    assert good.auc < 0.5 * rand.auc


def test_quality_helpers_and_embeddings():
    rng = np.random.default_rng(4)
    dirs_a, dirs_b = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    dirs_a /= np.linalg.norm(dirs_a, axis=1, keepdims=True)
    dirs_b /= np.linalg.norm(dirs_b, axis=1, keepdims=True)
    mag_a, mag_b = rng.uniform(10, 110, 50), rng.uniform(10, 110, 50)
    emb_a, emb_b = dirs_a * mag_a[:, None], dirs_b * mag_b[:, None]
    np.testing.assert_allclose(magnitudes(emb_a), mag_a)
    np.testing.assert_allclose(pair_quality(mag_a, mag_b), np.minimum(mag_a, mag_b))
    issame = rng.random(50) < 0.5
    got = erc_from_embeddings(emb_a, emb_b, issame, fmr=0.1)
    want = error_versus_reject(np.sum(dirs_a * dirs_b, 1), issame, np.minimum(mag_a, mag_b), fmr=0.1)
    np.testing.assert_allclose(got.fnmr, want.fnmr)
    np.testing.assert_array_equal(got.n_kept, want.n_kept)


def test_erc_is_nan_where_a_side_runs_out():
    # quality puts both impostors first: rejecting half leaves no impostor to set a threshold from
    scores = np.array([0.1, 0.2, 0.5, 0.6])
    issame = np.array([False, False, True, True])
    erc = error_versus_reject(scores, issame, np.array([1.0, 2.0, 3.0, 4.0]), fmr=0.5, reject=np.array([0.0, 0.5]))
    assert erc.fnmr[0] == 0.0 and np.isnan(erc.fnmr[1]) and np.isnan(erc.thresholds[1])
