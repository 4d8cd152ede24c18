"""Quality evaluation: the MagFace error-versus-reject curve (ERC) and its area.

Each pair gets the quality min(q_a, q_b) (for MagFace q = ‖f‖). For each reject fraction
r ∈ {0, 0.05, …, 0.95} the ⌊r·N⌋ lowest-quality pairs are dropped and FNMR at FMR 1e-3 is
measured on the rest. A quality score that predicts errors makes the curve fall steeply.

Where the threshold comes from. MagFace is often read as fixing the threshold once on all pairs;
its code (IrvingMeng/MagFace, eval/eval_quality/eval_quality.py,
``perform_1v1_quality_eval``) does not: inside the loop over reject rates it re-sorts the
impostor distances of the *kept* pairs and takes the threshold at FMR 1e-3 among them, so the
threshold is recomputed on every subset. That is our default (``fixed_threshold=False``), so our
curves are comparable with the paper's. ``fixed_threshold=True`` gives the other common variant
(ISO/IEC 29794-1 EDC, Grother & Tabassi): the threshold is set once on all pairs, the operating
point a deployment would keep, and only FNMR on the kept genuine pairs changes.

Threshold at FMR with few impostors. We use ``pairs.threshold_at_far``: the lowest t accepting
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

from training.eval.pairs import allowed_false_accepts, cosine_similarity, threshold_at_far

# 0, 0.05, …, 0.95 as in MagFace's np.arange(0, 0.98, 0.05); rounded so 0.15 is 0.15.
REJECT_FRACTIONS: np.ndarray = np.round(np.arange(20) * 0.05, 2)


def magnitudes(embeddings: np.ndarray) -> np.ndarray:
    """‖f‖ per row of (N, D): MagFace's quality. Returns (N,)."""
    return np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1)


def pair_quality(quality_a: np.ndarray, quality_b: np.ndarray) -> np.ndarray:
    """A pair is as good as its worse image: min(q_a, q_b)."""
    return np.minimum(np.asarray(quality_a, dtype=np.float64), np.asarray(quality_b, dtype=np.float64))


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


def erc_from_embeddings(
    emb_a: np.ndarray, emb_b: np.ndarray, issame: np.ndarray, fmr: float = 1e-3, fixed_threshold: bool = False
) -> ERCResult:
    """MagFace's evaluation from raw (unnormalised) embeddings: cosine scores, quality min(‖f_a‖, ‖f_b‖)."""
    quality = pair_quality(magnitudes(emb_a), magnitudes(emb_b))
    return error_versus_reject(cosine_similarity(emb_a, emb_b), issame, quality, fmr, fixed_threshold=fixed_threshold)
