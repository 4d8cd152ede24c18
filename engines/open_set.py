"""The open-set calibration: FPIR(t, N), the share of searches by someone not enrolled whose best score among N
enrolled identities reaches t, fitted on held-out identities (engines.model_card.OpenSet holds the numbers).

The model, in two parts:
  one comparison  impostor cosines above u (their 1 − zeta quantile) follow a generalised Pareto tail,
                  p(t) = zeta·(1 + xi·(t − u)/sigma)^(−1/xi)   (maximum likelihood on the all-vs-all impostors)
  one search      FPIR(t, N) = 1 − (1 − p(t))^k(N),   k(N) = min(N, theta·N^exponent)
k(N) is how many independent comparisons a search of N identities amounts to. Comparisons of one probe with N
people are not independent: a probe that resembles many people meets its near misses in every gallery and one
that resembles nobody meets none, so the best of N behaves like the best of fewer (the extremal index of dependent
maxima, here allowed to fall with N). theta and the exponent are fitted to the best impostor score of non-mated
searches in hold-out galleries of several sizes, at the operating points served (fit_comparisons), the tail
staying as fitted to the pairs. With theta = exponent = 1 (cards calibrated before this fit) k(N) = N: independence.

Duplicate identities. Public face sets label some people under two ids (CelebA does; so do sets built from the
same celebrities). Their "impostor" pairs are genuine and would put a same-person bump into the tail. Two
identities whose photos are on average closer to each other than the median genuine pair is (mean cross cosine >
median same-identity cosine) are taken for one person: their pairs leave the impostor set and neither is
searched against the other (`duplicate_identities`; the evaluation in benchmarks/open_set.py applies the same
rule to its distractors).
"""
from __future__ import annotations

import numpy as np

from engines.model_card import OpenSet, fpir_at, tail_threshold

CHECK_FPIRS = (0.1, 0.03, 0.01, 0.003, 0.001)
GALLERY_SIZES = (10, 30, 100, 300)
ZETA = 0.01  # the tail starts at the impostors' 99th percentile: enough exceedances (~1 % of millions) for the fit


def duplicate_identities(sim: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(C, C) bool: identity pairs whose mean cross cosine exceeds the median genuine cosine (taken for one person).
    `sim` (N, N) cosines of unit embeddings, `labels` (N,) in 0..C-1."""
    n = int(labels.max()) + 1
    onehot = np.zeros((len(labels), n))
    onehot[np.arange(len(labels)), labels] = 1
    count = onehot.sum(0)
    mean = (onehot.T @ sim @ onehot) / np.outer(count, count)
    same = (labels[:, None] == labels[None, :]) & ~np.eye(len(labels), dtype=bool)
    dup = mean > np.median(sim[same]) if same.any() else np.zeros((n, n), bool)
    np.fill_diagonal(dup, False)
    return dup


def impostor_matrix(unit: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, int]:
    """(cosines with same-identity and duplicate-identity entries set to NaN, duplicate identity pairs dropped)."""
    sim = unit.astype(np.float64) @ unit.T.astype(np.float64)
    dup = duplicate_identities(sim, labels)
    sim[(labels[:, None] == labels[None, :]) | dup[labels][:, labels]] = np.nan
    return sim, int(np.triu(dup).sum())


def fit_tail(impostor: np.ndarray, zeta: float = ZETA) -> tuple[float, float, float]:
    """(u, xi, sigma): a generalised Pareto fit (maximum likelihood) to the impostor scores above their 1 − zeta quantile."""
    from scipy import stats

    u = float(np.quantile(impostor, 1 - zeta))
    xi, _, sigma = stats.genpareto.fit(impostor[impostor > u] - u, floc=0)
    return u, float(xi), float(sigma)


def nonmated_maxima(imp: np.ndarray, labels: np.ndarray, n: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Best score of non-mated searches against galleries of n identities (one random photo each); every probe
    whose identity is not in the gallery searches it. `imp` is impostor_matrix's (NaN: never compared). n ≥
    identities − 1: each probe against every other identity, once."""
    rows = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    full = n >= len(rows) - 1
    out = []
    for _ in range(1 if full else reps):
        enrolled = np.array([rng.choice(r) for r in rows])
        sim = np.nan_to_num(imp[:, enrolled], nan=-np.inf)  # (P, C)
        if full:
            out.append(sim.max(1))
            continue
        gallery = rng.choice(len(rows), n, replace=False)
        out.append(sim[~np.isin(labels, gallery)][:, gallery].max(1))
    best = np.concatenate(out)
    return best[np.isfinite(best)]


def fit_comparisons(maxima: dict[int, np.ndarray], tail: OpenSet, min_events: int = 5) -> tuple[float, float]:
    """(theta, exponent) of k(N) = min(N, theta·N^exponent) that make the model's FPIR at the measured maxima's
    upper quantiles what those quantiles are: least squares of log FPIR(t̂, N) − log f over the (N, f) with at
    least `min_events` expected events, t̂ the empirical 1 − f quantile of the best scores at N. It fits the
    operating points the service promises (FPIR 0.1 to 0.001), not the bulk of the maxima, which a likelihood
    over every search would follow instead."""
    from scipy import optimize

    points = [(n, f, float(np.quantile(best, 1 - f))) for n, best in maxima.items() for f in CHECK_FPIRS
              if f * best.size >= min_events]

    def loss(v: np.ndarray) -> float:
        model = tail.model_copy(update=dict(theta=float(np.exp(v[0])), exponent=float(np.clip(v[1], 0.05, 1.5))))
        return sum((np.log(max(fpir_at(model, t, n), 1e-300)) - np.log(f)) ** 2 for n, f, t in points)

    res = optimize.minimize(loss, np.array([0.0, 1.0]), method="Nelder-Mead",
                            options=dict(xatol=1e-6, fatol=1e-10, maxiter=2000))
    return float(np.exp(res.x[0])), float(np.clip(res.x[1], 0.05, 1.5))


def calibrate_open_set(emb: np.ndarray, labels: np.ndarray, seed: int = 0, sizes=GALLERY_SIZES,
                       reps: int = 10) -> OpenSet:
    """The card's OpenSet from raw embeddings (N, D) of held-out identities (N,), checked against the measured
    maxima it was fitted to at FPIR CHECK_FPIRS (where at least two events are expected)."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    imp, duplicates = impostor_matrix(unit, labels)
    upper = imp[np.triu_indices(len(imp), k=1)]  # each unordered pair once
    impostor = upper[~np.isnan(upper)]
    u, xi, sigma = fit_tail(impostor)
    rng = np.random.default_rng(seed)
    sizes = [n for n in sizes if n < labels.max()] + [int(labels.max())]
    maxima = {n: nonmated_maxima(imp, labels, n, reps, rng) for n in sizes}
    model = OpenSet(u=u, zeta=ZETA, xi=xi, sigma=sigma, duplicates=duplicates, fpir_range=[0.5, 0.5],
                    gallery_sizes=sizes, max_ratio=1, probes=1, method="")
    theta, exponent = fit_comparisons(maxima, model)
    model = model.model_copy(update=dict(theta=theta, exponent=exponent))
    checked, ratios = [], []
    for n, best in maxima.items():
        for f in CHECK_FPIRS:
            if f * best.size < 2:  # fewer than two expected events: nothing to check against
                continue
            t = tail_threshold(model, f, n)
            measured, predicted = float(np.mean(best >= t)), fpir_at(model, t, n)
            ratios.append(max(measured / predicted, predicted / max(measured, 1 / best.size)))
            checked.append(f)
    return model.model_copy(update=dict(
        fpir_range=[min(checked), max(checked)], max_ratio=float(max(ratios)), probes=int(maxima[sizes[-1]].size),
        method=f"GPD (maximum likelihood) over the {impostor.size} all-vs-all impostor cosines above their "
               f"{100 * (1 - ZETA):g}th percentile ({duplicates} duplicate identity pairs left out: mean cross cosine "
               f"above the median genuine cosine); k(N) = min(N, theta N^exponent) fitted by least squares of log FPIR "
               f"at the empirical 1 - FPIR quantiles of the best scores of non-mated searches of hold-out galleries of N = {', '.join(map(str, sizes))} "
               f"identities (one random photo each; {reps} draws below the largest N); checked against those maxima at "
               f"FPIR {', '.join(f'{f:g}' for f in CHECK_FPIRS)} (engines/open_set.py)"))


# ---- a gallery calibrates itself --------------------------------------------------------------------------------
# The hold-out fixes the tail's shape; where the photos are, fixes where it starts. Impostor scores depend on the
# photos as well as on the model (LFW photos score ~3x colder than the CelebA hold-out at the same threshold,
# cfp-dev's hotter: benchmarks/RESULTS.md), and a gallery holds the photos of its site: every enrolled identity
# against every other is a non-mated comparison of that site. So a gallery of enough identities moves the tail to
# its own all-vs-all cosines: u at their 1 − zeta quantile, sigma from their mean excess over u (a GPD's mean
# excess is sigma/(1 − xi)), keeping the card's xi and k(N) (a few thousand pairs place a tail, they do not
# shape its far end).
GALLERY_MIN_IDS = 200  # 19,900 pairs: ~200 above the 99th percentile to place the tail
GALLERY_SAMPLE_IDS = 2000  # ~2M pairs: the quantile to 1e-3 of its spread, in ~0.1 s


def adapt_to_gallery(prior: OpenSet, vectors: np.ndarray) -> OpenSet:
    """The card's FPIR model moved to a gallery's own identities: `vectors` (n, D) unit embeddings of distinct
    enrolled identities (a sample of the gallery)."""
    v = np.asarray(vectors, np.float32)
    cosines = (v @ v.T)[np.triu_indices(len(v), k=1)].astype(np.float64)
    u = float(np.quantile(cosines, 1 - prior.zeta))
    excess = cosines[cosines > u] - u
    sigma = (1 - prior.xi) * float(excess.mean()) if excess.size else prior.sigma
    return prior.model_copy(update=dict(u=u, sigma=sigma, method=(
        f"the card's tail moved to {len(v)} of the gallery's identities ({cosines.size} pairs): u their "
        f"{100 * (1 - prior.zeta):g}th percentile, sigma (1 - xi) x their mean excess; xi and k(N) the card's")))
