"""Set-to-set verification, IJB-B/C style: fuse a set of images into one feature, TAR at FAR over template pairs.

A template is a set of images of one subject fused into one (D,) feature; the score of a template
pair is the cosine of the two fused features. TAR is reported at FAR 1e-6 … 1e-1 with the
threshold rule of ``pairs.threshold_at_far`` (the lowest t accepting at most ⌊FAR·n⌋ impostor
pairs; no interpolation between ROC points, unlike insightface's nearest-FPR lookup). A FAR is
only reported when FAR·n_impostors ≥ 1; the others are NaN with a note saying how many impostor
pairs they would need. Numpy only.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from engines.registry import Registry
from training.eval.pairs import TarAtFar, tar_at_far

IJB_FARS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)

FUSIONS: Registry = Registry("fusion")


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


@FUSIONS.register("mean")
def mean_of_normalised(features: np.ndarray) -> np.ndarray:
    """(n, D) → (D,): (1/n)·Σ_i f̂_i. Its norm (≤ 1) says how much the images agree; cosine scoring ignores it."""
    return _normalise(np.asarray(features, dtype=np.float64)).mean(axis=0)


@FUSIONS.register("magnitude")
def magnitude_weighted(features: np.ndarray) -> np.ndarray:
    """(n, D) → (D,): Σ_i ‖f_i‖·f̂_i / Σ_i ‖f_i‖. With MagFace features ‖f‖ is the quality, so sharp faces weigh more."""
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)  # (n, 1)
    return (norms * _normalise(features)).sum(axis=0) / max(float(norms.sum()), 1e-12)


def fuse(features: np.ndarray, template_ids: Sequence, method: str = "mean") -> tuple[np.ndarray, np.ndarray]:
    """Group (N, D) image features by template id and fuse each group. Returns (ids (T,), fused (T, D)), ids sorted."""
    features = np.asarray(features, dtype=np.float64)
    template_ids = np.asarray(template_ids)
    if features.ndim != 2 or template_ids.shape != (features.shape[0],):
        raise ValueError(f"need (N, D) features and N template ids, got {features.shape} and {template_ids.shape}")
    fusion = FUSIONS.get(method)
    ids, inverse = np.unique(template_ids, return_inverse=True)
    fused = np.stack([fusion(features[inverse == k]) for k in range(ids.size)])  # (T, D)
    return ids, fused


def _pair_rows(template_ids: np.ndarray, pairs: Sequence[tuple]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices (a, b) and genuine flags for a list of (template_a, template_b, is_genuine)."""
    row = {tid: k for k, tid in enumerate(template_ids.tolist())}
    try:
        a = np.array([row[p[0]] for p in pairs], dtype=np.int64)
        b = np.array([row[p[1]] for p in pairs], dtype=np.int64)
    except KeyError as err:
        raise KeyError(f"pair names template {err.args[0]!r}, which has no feature") from None
    return a, b, np.array([bool(p[2]) for p in pairs])


def template_scores(
    features: np.ndarray,
    template_ids: Sequence,
    pairs: Sequence[tuple] | None = None,
    labels: Sequence | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(scores, is_genuine) for the given template pairs, or for all T(T−1)/2 pairs when ``pairs`` is None.

    Without a pair list, ``labels`` (subject per template) decides which pairs are genuine.
    """
    feats = _normalise(np.asarray(features, dtype=np.float64))  # (T, D)
    template_ids = np.asarray(template_ids)
    if feats.ndim != 2 or template_ids.shape != (feats.shape[0],):
        raise ValueError(f"need (T, D) features and T template ids, got {feats.shape} and {template_ids.shape}")
    if pairs is not None:
        a, b, genuine = _pair_rows(template_ids, pairs)
        return np.einsum("nd,nd->n", feats[a], feats[b]), genuine
    if labels is None:
        raise ValueError("all-vs-all scoring needs labels (the subject of each template)")
    labels = np.asarray(labels)
    if labels.shape != template_ids.shape:
        raise ValueError(f"{labels.size} labels for {template_ids.size} templates")
    a, b = np.triu_indices(feats.shape[0], k=1)
    return (feats @ feats.T)[a, b], labels[a] == labels[b]


def template_tar_at_far(
    features: np.ndarray,
    template_ids: Sequence,
    pairs: Sequence[tuple] | None = None,
    labels: Sequence | None = None,
    fars: Sequence[float] = IJB_FARS,
) -> TarAtFar:
    """TAR at each FAR over template pairs; (T, D) features are already fused (see ``fuse``)."""
    scores, genuine = template_scores(features, template_ids, pairs, labels)
    return tar_at_far(scores, genuine, fars)
