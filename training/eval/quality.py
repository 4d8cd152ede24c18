"""Quality evaluation: the MagFace error-versus-reject curve (ERC) from raw embeddings.

Each pair gets the quality min(q_a, q_b) (for MagFace q = ‖f‖). The curve itself, its two threshold
conventions and the threshold at FMR are `engines.error_rates` (torch-free: model calibration checks a
quality source with it); they are re-exported here.
"""
from __future__ import annotations

import numpy as np

from engines.error_rates import REJECT_FRACTIONS, ERCResult, area_under_erc, error_versus_reject  # noqa: F401 (re-exported)
from training.eval.pairs import cosine_similarity


def magnitudes(embeddings: np.ndarray) -> np.ndarray:
    """‖f‖ per row of (N, D): MagFace's quality. Returns (N,)."""
    return np.linalg.norm(np.asarray(embeddings, dtype=np.float64), axis=1)


def pair_quality(quality_a: np.ndarray, quality_b: np.ndarray) -> np.ndarray:
    """A pair is as good as its worse image: min(q_a, q_b)."""
    return np.minimum(np.asarray(quality_a, dtype=np.float64), np.asarray(quality_b, dtype=np.float64))


def erc_from_embeddings(
    emb_a: np.ndarray, emb_b: np.ndarray, issame: np.ndarray, fmr: float = 1e-3, fixed_threshold: bool = False
) -> ERCResult:
    """MagFace's evaluation from raw (unnormalised) embeddings: cosine scores, quality min(‖f_a‖, ‖f_b‖)."""
    quality = pair_quality(magnitudes(emb_a), magnitudes(emb_b))
    return error_versus_reject(cosine_similarity(emb_a, emb_b), issame, quality, fmr, fixed_threshold=fixed_threshold)
