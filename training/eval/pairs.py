"""Pair verification, LFW View 2 style: pairs files, k-fold accuracy, ROC, thresholds at a FAR.

A score is the cosine similarity of two L2-normalised embeddings, s = f̂_a·f̂_b, and a pair is
declared "same" when s ≥ t. Every function here takes plain numpy arrays, so training and the
service-side ``faceset eval`` use it alike on embeddings from any engine (numpy only, no torch).

k-fold protocol (LFW View 2): for each fold k the threshold that maximises accuracy on the other
folds is chosen and the accuracy on fold k is reported; the result is the mean ± std (population
std, ddof 0, as insightface reports it) over folds, with the per-fold thresholds. A pairs file
with several official folds uses them. With a single official fold (our lfw-dev data holds fold
1 only), ``balanced_folds`` splits it: the same pairs, in file order, are cut into ``n_folds``
contiguous chunks and so are the different pairs; fold k is chunk k of each. Every fold keeps
the same/different balance of the whole, and because pairs files are sorted by name, contiguous
chunks keep most of an identity's pairs together. The split is not guaranteed identity-disjoint
like the ten official folds: a name can straddle two chunks, or appear in both a same and a
different pair; since only one scalar threshold is learnt, that leak is small.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from engines.error_rates import allowed_false_accepts, threshold_at_far  # noqa: F401 (re-exported)

# FARs at which verification reports TAR by default; which are resolvable depends on the impostor count.
DEFAULT_FARS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)


class Pair(NamedTuple):
    path_a: Path
    path_b: Path
    issame: bool
    fold: int  # 0-based official fold index


# ---------------------------------------------------------------- pairs files


def image_path(images_dir: Path, name: str, number: int) -> Path:
    """LFW image path: images_dir/name/name_0001.jpg, or flat images_dir/name_0001.jpg where there is no name folder."""
    filename = f"{name}_{number:04d}.jpg"
    nested = images_dir / name
    return nested / filename if nested.is_dir() else images_dir / filename


def _parse_header(fields: list[str]) -> tuple[int, int]:
    """(folds, pairs_per_half): "10 300" (View 2) or a bare "1100" (View 1 files)."""
    if len(fields) == 1:
        return 1, int(fields[0])
    if len(fields) == 2:
        return int(fields[0]), int(fields[1])
    raise ValueError(f"pairs header must be 'folds pairs_per_half', got {' '.join(fields)!r}")


def _parse_pair(fields: list[str], lineno: int, same: bool, fold: int, images_dir: Path) -> Pair:
    if same and len(fields) == 3:
        name, i, j = fields
        return Pair(image_path(images_dir, name, int(i)), image_path(images_dir, name, int(j)), True, fold)
    if not same and len(fields) == 4:
        name_a, i, name_b, j = fields
        return Pair(image_path(images_dir, name_a, int(i)), image_path(images_dir, name_b, int(j)), False, fold)
    kind = "a same pair 'name i j'" if same else "a different pair 'name1 i name2 j'"
    raise ValueError(f"line {lineno}: expected {kind}, got {' '.join(fields)!r}")


def read_pairs(pairs_file: str | Path, images_dir: str | Path) -> list[Pair]:
    """Parse an LFW-style pairs file into (path_a, path_b, issame, fold) tuples, in file order.

    Format: a header "folds<TAB>pairs_per_half", then per fold ``pairs_per_half`` same lines
    "name i j" followed by ``pairs_per_half`` different lines "name1 i name2 j".
    """
    images_dir = Path(images_dir)
    rows = [(no, line.split()) for no, line in enumerate(Path(pairs_file).read_text().splitlines(), 1)]
    rows = [(no, fields) for no, fields in rows if fields]
    if not rows:
        raise ValueError(f"{pairs_file}: empty pairs file")
    n_folds, per_half = _parse_header(rows[0][1])
    body = rows[1:]
    if len(body) != 2 * n_folds * per_half:
        raise ValueError(f"{pairs_file}: header promises {n_folds}×2×{per_half} pairs, found {len(body)} lines")
    pairs = []
    for k, (lineno, fields) in enumerate(body):
        fold, within = divmod(k, 2 * per_half)
        pairs.append(_parse_pair(fields, lineno, within < per_half, fold, images_dir))
    return pairs


# ---------------------------------------------------------------- scores


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cos between (N, D) and (N, D) after L2 normalisation, in float64. Returns (N,)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"need two (N, D) arrays of one shape, got {a.shape} and {b.shape}")
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.einsum("nd,nd->n", a, b)


def _as_scores(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64).ravel()
    issame = np.asarray(issame, dtype=bool).ravel()
    if scores.shape != issame.shape or scores.size == 0:
        raise ValueError(f"scores and issame must be non-empty and of one length, got {scores.size} and {issame.size}")
    return scores, issame


# ---------------------------------------------------------------- accuracy and k-fold


def accuracy_at(scores: np.ndarray, issame: np.ndarray, threshold: float) -> float:
    """Fraction of pairs decided right by "same iff s ≥ threshold"."""
    scores, issame = _as_scores(scores, issame)
    return float(np.mean((scores >= threshold) == issame))


def accuracy_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Accuracy at every distinct decision, in ascending threshold order.

    With the n scores sorted, "reject the lowest i" for i = 0..n are the only distinct decisions
    (only where score i−1 < score i, so ties move together). Their thresholds: the lowest score
    (accept all), the midpoint between the neighbours, and just above the highest (reject all).
    correct(i) = #different among the lowest i + #same among the rest.
    """
    scores, issame = _as_scores(scores, issame)
    order = np.argsort(scores, kind="stable")
    s, y = scores[order], issame[order]
    n = s.size
    diff_below = np.concatenate([[0], np.cumsum(~y)])  # (n+1,)
    same_above = y.sum() - np.concatenate([[0], np.cumsum(y)])  # (n+1,)
    mid = s[:-1] + (s[1:] - s[:-1]) / 2
    mid = np.where(mid > s[:-1], mid, s[1:])  # adjacent floats: the midpoint would round onto the lower one
    thresholds = np.concatenate([[s[0]], mid, [np.nextafter(s[-1], np.inf)]])
    valid = np.concatenate([[True], s[1:] > s[:-1], [True]])
    return thresholds[valid], (diff_below + same_above)[valid] / n


def best_threshold(scores: np.ndarray, issame: np.ndarray) -> tuple[float, float]:
    """(threshold, accuracy) maximising accuracy over all given pairs.

    Ties go to the lowest threshold, as np.argmax over insightface's ascending grid does.
    """
    thresholds, acc = accuracy_curve(scores, issame)
    k = int(np.argmax(acc))
    return float(thresholds[k]), float(acc[k])


def balanced_folds(issame: np.ndarray, n_folds: int = 10) -> np.ndarray:
    """Fold index per pair: same pairs and different pairs each cut, in order, into n_folds contiguous chunks. (N,) int."""
    issame = np.asarray(issame, dtype=bool).ravel()
    if n_folds < 2:
        raise ValueError(f"n_folds must be at least 2, got {n_folds}")
    folds = np.empty(issame.size, dtype=np.int64)
    for cls in (True, False):
        idx = np.flatnonzero(issame == cls)
        if idx.size < n_folds:
            raise ValueError(f"{idx.size} {'same' if cls else 'different'} pairs cannot fill {n_folds} folds")
        for k, chunk in enumerate(np.array_split(idx, n_folds)):
            folds[chunk] = k
    return folds


@dataclass
class KFoldResult:
    accuracies: np.ndarray  # (K,) held-out accuracy per fold
    thresholds: np.ndarray  # (K,) threshold chosen on the other folds
    folds: np.ndarray  # (N,) fold index per pair

    @property
    def mean(self) -> float:
        return float(np.mean(self.accuracies))

    @property
    def std(self) -> float:
        return float(np.std(self.accuracies))


def _resolve_folds(issame: np.ndarray, folds: np.ndarray | None, n_folds: int) -> np.ndarray:
    """The official folds where there are at least two, else a balanced split into n_folds."""
    if folds is not None:
        folds = np.asarray(folds).ravel()
        if folds.shape != issame.shape:
            raise ValueError(f"folds has {folds.size} entries for {issame.size} pairs")
        if np.unique(folds).size >= 2:
            return folds
    return balanced_folds(issame, n_folds)


def kfold_accuracy(
    scores: np.ndarray, issame: np.ndarray, folds: np.ndarray | None = None, n_folds: int = 10
) -> KFoldResult:
    """LFW View 2 accuracy: threshold fitted on all folds but one, accuracy on that one, for each fold."""
    scores, issame = _as_scores(scores, issame)
    folds = _resolve_folds(issame, folds, n_folds)
    accs, thresholds = [], []
    for k in np.unique(folds):
        test = folds == k
        t, _ = best_threshold(scores[~test], issame[~test])
        thresholds.append(t)
        accs.append(accuracy_at(scores[test], issame[test], t))
    return KFoldResult(np.asarray(accs), np.asarray(thresholds), folds)


# ---------------------------------------------------------------- ROC and FAR


def roc_curve(scores: np.ndarray, issame: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(far, tar, thresholds) at every distinct score, threshold descending, starting at (0, 0).

    far(t) = #{impostor s ≥ t}/#impostor, tar(t) = #{genuine s ≥ t}/#genuine.
    """
    scores, issame = _as_scores(scores, issame)
    n_gen, n_imp = int(issame.sum()), int((~issame).sum())
    if n_gen == 0 or n_imp == 0:
        raise ValueError(f"a ROC needs genuine and impostor pairs, got {n_gen} and {n_imp}")
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], issame[order]
    last = np.concatenate([s[1:] < s[:-1], [True]])  # last position of each distinct score
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    thresholds = np.concatenate([[np.nextafter(s[0], np.inf)], s[last]])
    return np.concatenate([[0.0], fp / n_imp]), np.concatenate([[0.0], tp / n_gen]), thresholds


@dataclass
class TarAtFar:
    """TAR at each requested FAR. A FAR is resolvable when FAR·n_impostors ≥ 1 (at least one
    impostor may be accepted); otherwise no threshold distinguishes it from FAR 0 and its TAR and
    threshold are NaN."""

    fars: np.ndarray  # (F,)
    tars: np.ndarray  # (F,) NaN where not resolvable
    thresholds: np.ndarray  # (F,) NaN where not resolvable
    resolvable: np.ndarray  # (F,) bool
    n_genuine: int
    n_impostors: int
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, float]:
        return {f"{far:g}": float(tar) for far, tar in zip(self.fars, self.tars)}


def tar_at_far(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float] = DEFAULT_FARS) -> TarAtFar:
    """TAR = #{genuine s ≥ t}/#genuine at t = threshold_at_far(impostors, FAR), for each FAR."""
    scores, issame = _as_scores(scores, issame)
    gen, imp = scores[issame], scores[~issame]
    if gen.size == 0 or imp.size == 0:
        raise ValueError(f"TAR@FAR needs genuine and impostor pairs, got {gen.size} and {imp.size}")
    fars = np.asarray(fars, dtype=np.float64)
    resolvable = np.array([allowed_false_accepts(imp.size, f) >= 1 for f in fars], dtype=bool)
    thresholds = np.array([threshold_at_far(imp, f) if ok else np.nan for f, ok in zip(fars, resolvable)])
    tars = np.array([np.mean(gen >= t) if ok else np.nan for t, ok in zip(thresholds, resolvable)])
    notes = [
        f"FAR {f:g} not resolvable with {imp.size} impostor pairs (needs ≥ {int(np.ceil(1 / f))}); reported as NaN"
        for f, ok in zip(fars, resolvable)
        if not ok
    ]
    return TarAtFar(fars, tars, thresholds, resolvable, int(gen.size), int(imp.size), notes)


# ---------------------------------------------------------------- one call for a pairs benchmark


@dataclass
class PairsReport:
    kfold: KFoldResult
    best_threshold: float  # maximising accuracy over all pairs (no held-out fold)
    best_accuracy: float
    tar_at_far: TarAtFar
    roc: tuple[np.ndarray, np.ndarray, np.ndarray]  # (far, tar, thresholds)

    def summary(self) -> dict:
        return {
            "accuracy_mean": self.kfold.mean,
            "accuracy_std": self.kfold.std,
            "fold_accuracies": self.kfold.accuracies.tolist(),
            "fold_thresholds": self.kfold.thresholds.tolist(),
            "best_threshold": self.best_threshold,
            "best_accuracy": self.best_accuracy,
            "tar_at_far": self.tar_at_far.as_dict(),
            "notes": list(self.tar_at_far.notes),
        }


def evaluate_pairs(
    emb_a: np.ndarray,
    emb_b: np.ndarray,
    issame: np.ndarray,
    folds: np.ndarray | None = None,
    n_folds: int = 10,
    fars: Sequence[float] = DEFAULT_FARS,
) -> PairsReport:
    """k-fold accuracy, best threshold, TAR@FAR and ROC for (N, D) embeddings of the two sides of N pairs."""
    scores = cosine_similarity(emb_a, emb_b)
    t, acc = best_threshold(scores, issame)
    return PairsReport(
        kfold=kfold_accuracy(scores, issame, folds, n_folds),
        best_threshold=t,
        best_accuracy=acc,
        tar_at_far=tar_at_far(scores, issame, fars),
        roc=roc_curve(scores, issame),
    )
