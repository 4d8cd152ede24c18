"""Pair error rates on numpy scores: the threshold at a false accept rate and the error-versus-reject curve.

A score is a cosine; a pair is declared "same" when s ≥ t. Torch-free and free of our other
packages: model calibration (engines.calibration) and training's evaluation (training.eval) share it.

Error-versus-reject (MagFace's ERC). Each pair gets a quality (min of its two faces'); for each reject
fraction r the ⌊r·N⌋ lowest-quality pairs are dropped and FNMR at FMR 1e-3 is measured on the rest. A quality
score that predicts errors makes the curve fall steeply; one that does not leaves it flat.

Where the threshold comes from. MagFace is often read as fixing the threshold once on all pairs;
its code (IrvingMeng/MagFace, eval/eval_quality/eval_quality.py,
``perform_1v1_quality_eval``) does not: inside the loop over reject rates it re-sorts the
impostor distances of the *kept* pairs and takes the threshold at FMR 1e-3 among them, so the
threshold is recomputed on every subset. That is our default (``fixed_threshold=False``), so our
curves are comparable with the paper's. ``fixed_threshold=True`` gives the other common variant
(ISO/IEC 29794-1 EDC, Grother & Tabassi): the threshold is set once on all pairs, the operating
point a deployment would keep, and only FNMR on the kept genuine pairs changes.

Threshold at FMR with few impostors. ``threshold_at_far`` is the lowest t accepting
at most k = ⌊FMR·n⌋ of the n impostor pairs (genuine pairs are matched when s ≥ t). MagFace's
code picks the impostor at sorted position ⌊(n−1)/1000⌋, i.e. it allows ⌊(n−1)·FMR⌋ false
matches, one fewer than us when 1000 divides n. With fewer than 1/FMR impostors (our lfw-dev's 300,
or LFW's 3000 once two thirds of the pairs are dropped) k = 0: the threshold sits just above the best impostor,
an empirical FMR of 0. MagFace's code does the same (it stops at the first sorted impostor); we
do not interpolate beyond the data, and flag those points in ``fmr_resolvable``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# n·FAR is a float product; this keeps 1e-3·3000 from flooring to 2.
_COUNT_EPS = 1e-9


def allowed_false_accepts(n_impostors: int, far: float) -> int:
    """k = ⌊FAR·n⌋: the most impostor pairs a threshold at this FAR may accept."""
    return int(np.floor(far * n_impostors + _COUNT_EPS))


def threshold_at_far(impostor_scores: np.ndarray, far: float) -> float:
    """The lowest t with #{impostor s ≥ t} ≤ ⌊FAR·n⌋, i.e. the fraction of impostors accepted is ≤ FAR.

    With impostor scores sorted descending s_1 ≥ … ≥ s_n and k = ⌊FAR·n⌋, t is the next float
    above s_{k+1}: any lower t accepts s_{k+1} too. When k = 0 (fewer than 1/FAR impostors) t
    lies just above the highest impostor: the empirical FAR is 0, stricter than asked; nothing
    is interpolated beyond the data. When k ≥ n every pair is accepted (t = the lowest score).
    """
    imp = np.sort(np.asarray(impostor_scores, dtype=np.float64).ravel())[::-1]
    if imp.size == 0:
        raise ValueError("threshold_at_far needs at least one impostor score")
    if not 0.0 <= far <= 1.0:
        raise ValueError(f"far must be in [0, 1], got {far}")
    k = allowed_false_accepts(imp.size, far)
    if k >= imp.size:
        return float(imp[-1])
    return float(np.nextafter(imp[k], np.inf))


# 0, 0.05, …, 0.95 as in MagFace's np.arange(0, 0.98, 0.05); rounded so 0.15 is 0.15.
REJECT_FRACTIONS: np.ndarray = np.round(np.arange(20) * 0.05, 2)


@dataclass
class ERCResult:
    reject: np.ndarray  # (R,) fraction of pairs dropped
    fnmr: np.ndarray  # (R,) FNMR of the kept genuine pairs (NaN where none is kept)
    thresholds: np.ndarray  # (R,) similarity threshold used at each r
    n_kept: np.ndarray  # (R,) pairs kept
    fmr_resolvable: np.ndarray  # (R,) bool: FMR·(impostors the threshold came from) ≥ 1
    fmr: float
    fixed_threshold: bool

    @property
    def auc(self) -> float:
        return area_under_erc(self.reject, self.fnmr)


def area_under_erc(reject: np.ndarray, fnmr: np.ndarray) -> float:
    """Trapezoidal area under FNMR(r) over the reject fractions given (0 … 0.95 by default, not normalised)."""
    x, y = np.asarray(reject, dtype=np.float64), np.asarray(fnmr, dtype=np.float64)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def _fnmr(genuine_scores: np.ndarray, threshold: float) -> float:
    """Fraction of genuine pairs below the threshold; NaN without genuine pairs or without a threshold (no impostors)."""
    if genuine_scores.size == 0 or np.isnan(threshold):
        return float("nan")
    return float(np.mean(genuine_scores < threshold))


def _threshold(impostor_scores: np.ndarray, fmr: float) -> tuple[float, bool]:
    if impostor_scores.size == 0:
        return float("nan"), False
    return threshold_at_far(impostor_scores, fmr), allowed_false_accepts(impostor_scores.size, fmr) >= 1


def error_versus_reject(
    scores: np.ndarray,
    issame: np.ndarray,
    quality: np.ndarray,
    fmr: float = 1e-3,
    reject: np.ndarray = REJECT_FRACTIONS,
    fixed_threshold: bool = False,
) -> ERCResult:
    """FNMR at ``fmr`` after dropping the lowest-quality fraction r of the N pairs, for each r.

    scores: (N,) similarities; issame: (N,) genuine flags; quality: (N,) pair quality
    (``pair_quality``). Ties in quality are broken by pair order (stable sort).
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    issame = np.asarray(issame, dtype=bool).ravel()
    quality = np.asarray(quality, dtype=np.float64).ravel()
    if not scores.size == issame.size == quality.size > 0:
        sizes = f"{scores.size}, {issame.size}, {quality.size}"
        raise ValueError(f"scores, issame, quality must be non-empty and of one length, got {sizes}")
    order = np.argsort(quality, kind="stable")  # lowest quality first
    reject = np.asarray(reject, dtype=np.float64)
    fixed = _threshold(scores[~issame], fmr)
    fnmr, thresholds, n_kept, resolvable = [], [], [], []
    for r in reject:
        kept = order[int(np.floor(r * scores.size + 1e-9)) :]
        s, y = scores[kept], issame[kept]
        t, ok = fixed if fixed_threshold else _threshold(s[~y], fmr)
        fnmr.append(_fnmr(s[y], t))
        thresholds.append(t)
        n_kept.append(kept.size)
        resolvable.append(ok)
    return ERCResult(
        reject, np.asarray(fnmr), np.asarray(thresholds), np.asarray(n_kept), np.asarray(resolvable), fmr, fixed_threshold
    )
