"""engines.open_set: the FPIR(t, N) model against its formula, duplicate identities, and the fitted model against
measured non-mated searches of people it was not fitted on."""
from __future__ import annotations

import math

import numpy as np
import pytest

from engines.model_card import OpenSet, comparisons, fpir_at, tail_threshold
from engines.open_set import (adapt_to_gallery, calibrate_open_set, duplicate_identities, impostor_matrix,
                              nonmated_maxima)


def _model(**kw) -> OpenSet:
    base = dict(u=0.8, zeta=0.01, xi=-0.1, sigma=0.02, fpir_range=[0.001, 0.1], gallery_sizes=[10], max_ratio=1,
                probes=1, method="test")
    return OpenSet(**{**base, **kw})


def _identities(n_ids=150, per=3, seed=0, dim=16):
    rng = np.random.default_rng(seed)
    emb = rng.normal(size=(n_ids * per, dim)) + np.repeat(rng.normal(size=(n_ids, dim)) * 2, per, axis=0)
    return emb, np.repeat(np.arange(n_ids), per)


def _unit(emb):
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def test_fpir_follows_the_formula_on_known_values():
    """t = 0.83: p = 0.01·(1 − 0.1·1.5)^10 = 0.01·0.85^10; N = 100 amounts to k = 2·100^0.75 ≈ 63.2 comparisons."""
    m = _model(theta=2.0, exponent=0.75)
    p = 0.01 * 0.85 ** 10
    k = 2 * 100 ** 0.75
    assert comparisons(m, 100) == pytest.approx(k)
    assert fpir_at(m, 0.83, 100) == pytest.approx(1 - (1 - p) ** k, rel=1e-12)
    assert tail_threshold(m, fpir_at(m, 0.83, 100), 100) == pytest.approx(0.83, abs=1e-12)
    # never more comparisons than identities: at N = 5, 2·5^0.75 ≈ 6.7 > 5
    assert comparisons(m, 5) == 5 and fpir_at(m, 0.83, 5) == pytest.approx(1 - (1 - p) ** 5, rel=1e-12)


def test_cards_without_the_fit_keep_independence():
    """theta = exponent = 1 (the defaults, as cards calibrated before the fit load): FPIR = 1 − (1 − p)^N."""
    m = _model()
    p = 0.01 * (1 - 0.1 * 0.02 / 0.02) ** 10
    assert m.theta == m.exponent == 1.0
    assert fpir_at(m, 0.82, 1000) == pytest.approx(-math.expm1(1000 * math.log1p(-p)), rel=1e-12)


def test_duplicate_identities_are_found_and_left_out():
    """Identity 7's photos are re-drawn around identity 3's centre (one person under two ids): that pair, and only
    that pair, is taken for one person, and its cosines leave the impostor matrix."""
    emb, labels = _identities(40, per=4)
    rng = np.random.default_rng(5)
    centre = emb[labels == 3].mean(0)
    emb[labels == 7] = centre + rng.normal(size=(4, 16))
    unit = _unit(emb)
    dup = duplicate_identities(unit @ unit.T, labels)
    assert np.argwhere(np.triu(dup)).tolist() == [[3, 7]]
    imp, dropped = impostor_matrix(unit, labels)
    assert dropped == 1
    assert np.isnan(imp[np.ix_(labels == 3, labels == 7)]).all() and np.isnan(imp[np.ix_(labels == 7, labels == 3)]).all()
    assert np.isnan(imp[np.ix_(labels == 1, labels == 1)]).all()  # genuine pairs are no impostors either
    assert not np.isnan(imp[np.ix_(labels == 1, labels == 2)]).any()


def test_fitted_model_predicts_searches_of_people_it_never_saw():
    """Fitted on 150 identities, the model's thresholds give a measured FPIR within a factor of 2 of the requested
    on non-mated searches of 150 other identities of the same population, at several gallery sizes."""
    emb, labels = _identities(150, seed=0)
    model = calibrate_open_set(emb, labels)
    assert model.fpir_range[1] == 0.1 and model.gallery_sizes[-1] == 149 and model.duplicates == 0
    fresh, fresh_labels = _identities(150, seed=1)
    imp, _ = impostor_matrix(_unit(fresh), fresh_labels)
    for n in (30, 100, 149):
        best = nonmated_maxima(imp, fresh_labels, n, 10, np.random.default_rng(2))
        for fpir in (0.1, 0.03):
            measured = np.mean(best >= tail_threshold(model, fpir, n))
            assert 0.5 < measured / fpir < 2, (n, fpir, measured)


def test_thresholds_rise_with_the_gallery_and_k_stays_below_n():
    emb, labels = _identities(150)
    model = calibrate_open_set(emb, labels)
    sizes = (1, 10, 100, 10_000, 1_000_000)
    assert all(comparisons(model, n) <= n for n in sizes)
    thresholds = [tail_threshold(model, 0.01, n) for n in sizes]
    assert thresholds == sorted(thresholds) and len(set(thresholds)) > 1


def test_adapt_to_gallery_moves_the_tail_to_the_gallery_cosines():
    """u is the gallery's all-vs-all cosines' (1 − zeta) quantile and sigma (1 − xi) × their mean excess over it;
    the card's shape and k(N) stay."""
    prior = _model(theta=1.5, exponent=0.9)
    unit = _unit(np.random.default_rng(4).normal(size=(60, 16)))
    cosines = np.array([unit[i] @ unit[j] for i in range(60) for j in range(i + 1, 60)])
    site = adapt_to_gallery(prior, unit)
    u = np.quantile(cosines, 0.99)
    assert site.u == pytest.approx(u, abs=1e-6)
    assert site.sigma == pytest.approx(1.1 * np.mean(cosines[cosines > u] - u), rel=1e-5)
    assert (site.xi, site.theta, site.exponent, site.fpir_range) == (prior.xi, 1.5, 0.9, prior.fpir_range)


def test_a_site_with_its_own_look_gets_its_promised_fpir_back():
    """The model fitted on one population is far too lenient for a site whose photos share a common look (a
    component every face there has: one camera, one light), so strangers there score higher: moved to a gallery of
    that site, its thresholds give the requested FPIR within a factor of 2 to the site's strangers, where the unmoved
    model lets in several times more."""
    emb, labels = _identities(150, seed=0)
    prior = calibrate_open_set(emb, labels)
    rng = np.random.default_rng(7)
    centres = rng.normal(size=(400, 16)) * 2 + rng.normal(size=16)  # the site's common look
    photos = np.repeat(centres, 3, axis=0) + rng.normal(size=(1200, 16))
    people = np.repeat(np.arange(400), 3)
    gallery = _unit(photos[::3][:250])  # 250 enrolled, one photo each; people 250-399 are strangers
    site = adapt_to_gallery(prior, gallery)
    strangers = _unit(photos[people >= 250])
    best = (strangers @ gallery.T).max(1)
    for fpir in (0.1, 0.03):
        moved = np.mean(best >= tail_threshold(site, fpir, 250)) / fpir
        unmoved = np.mean(best >= tail_threshold(prior, fpir, 250)) / fpir
        assert 0.5 < moved < 2 and unmoved > 3, (fpir, moved, unmoved)
