"""Calibrate a model card on held-out identities: verification thresholds at FARs, and the quality range.

Torch-free: the exported ONNX runs through the card's engine on faces of identities never
trained on (training.data.split). Every pair of faces is scored: same identity = genuine, other
identities = impostor (all-vs-all). The threshold at FAR f is the lowest cosine accepting at most
⌊f·impostors⌋ impostor pairs (training.eval.pairs.threshold_at_far). A card without a quality mapping
gets one (magnitudes mapped linearly between their 1st and 99th percentiles on the same faces); a card
that has one keeps it (unless `set_quality`): the mapping is part of the model, not of its calibration
(stored gallery and template qualities, and the CAFace fusion model trained on it, depend on it).

Card version 2 adds, from the same faces (ModelCard's OpenSet, QualityBand, QualityFloors):
  open set   a generalised Pareto tail fitted to the impostor cosines above their (1 − zeta) quantile
             gives FPIR(t, N) = 1 − (1 − P(s ≥ t))^N; it is checked against the measured best impostor
             score of non-mated searches in galleries of N held-out identities (one photo each, drawn
             at random; the largest N is every other identity).
  bands      FAR thresholds per band of the pair's lower quality; the band edges are quantiles of the
             impostor pairs' lower quality (so every band holds enough impostors for FAR 1e-4).
  floors     genuine pairs binned by their lower quality (20 quantile bins); a bin errs when it fails the
             FAR 1e-3 threshold more often than `ratio` × the median bin. A floor is the upper edge of
             the run of erring bins from the bottom: ratio 1.25 for probes (errors clearly climb: the answer
             is low_quality), 1.5 for enrolments (a refusal turns a person away, so only where errors are far
             above typical; an identity is refused only when none of its photos reaches it).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from engines.base import build_engine, embed_aligned
from engines.model_card import (Calibration, ModelCard, OpenSet, Quality, QualityBand, QualityFloors, fpir_at,
                                quality_from_magnitude, tail_threshold)
from training.data.folder import list_identities
from training.eval.pairs import threshold_at_far

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
CHECK_FPIRS = (0.1, 0.03, 0.01, 0.003, 0.001)
BAND_QUANTILES = (0.5, 0.8, 0.95)  # of the impostor pairs' lower quality
FLOOR_RATIOS = (1.25, 1.5)  # probes, enrolments


def embed_tree(card: ModelCard, root: Path, threads: int = 0, batch: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Raw embeddings (N, D) and integer identity labels (N,) of every crop under root/<identity>/."""
    engine = build_engine("onnxruntime", card=card, intra_op_threads=threads)
    ids = list_identities(root)
    paths = [(p, label) for label, name in enumerate(sorted(ids)) for p in ids[name]]
    out = []
    for i in range(0, len(paths), batch):
        faces = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in paths[i : i + batch]])
        out.append(embed_aligned(engine, card, faces))
    return np.concatenate(out), np.array([label for _, label in paths])


def pair_scores(emb: np.ndarray, labels: np.ndarray, quality: np.ndarray | None = None):
    """(genuine, impostor) cosines over all unordered pairs; with `quality` (N,) also each pair's lower quality
    as (genuine_q, impostor_q)."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T  # (N, N)
    iu = np.triu_indices(len(emb), k=1)
    same = labels[iu[0]] == labels[iu[1]]
    s = sim[iu]
    if quality is None:
        return s[same], s[~same]
    lower = np.minimum(quality[iu[0]], quality[iu[1]])
    return s[same], s[~same], lower[same], lower[~same]


def fit_tail(impostor: np.ndarray, zeta: float = 0.01) -> tuple[float, float, float]:
    """(u, xi, sigma): a generalised Pareto fit (maximum likelihood) to the impostor scores above their 1 − zeta quantile."""
    from scipy import stats

    u = float(np.quantile(impostor, 1 - zeta))
    xi, _, sigma = stats.genpareto.fit(impostor[impostor > u] - u, floc=0)
    return u, float(xi), float(sigma)


def nonmated_maxima(unit: np.ndarray, labels: np.ndarray, n: int, reps: int, rng: np.random.Generator) -> np.ndarray:
    """Best score of non-mated searches against galleries of n identities (one random photo each); every probe
    whose identity is not in the gallery searches it. n ≥ identities − 1: each probe against all other identities."""
    rows = [np.flatnonzero(labels == c) for c in range(labels.max() + 1)]
    out = []
    for _ in range(1 if n >= len(rows) - 1 else reps):
        enrolled = np.array([rng.choice(r) for r in rows])
        sim = unit @ unit[enrolled].T  # (P, C)
        sim[np.arange(len(labels)), labels] = -np.inf  # a probe is never searched against itself
        if n >= len(rows) - 1:
            out.append(sim.max(1))
            continue
        gallery = rng.choice(len(rows), n, replace=False)
        out.append(sim[~np.isin(labels, gallery)][:, gallery].max(1))
    return np.concatenate(out)


def calibrate_open_set(emb: np.ndarray, labels: np.ndarray, impostor: np.ndarray, seed: int = 0,
                       sizes=(10, 30, 100, 300), reps: int = 10) -> OpenSet:
    u, xi, sigma = fit_tail(impostor)
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    sizes = [n for n in sizes if n < labels.max()] + [int(labels.max())]
    candidate = OpenSet(u=u, zeta=0.01, xi=xi, sigma=sigma, fpir_range=[0.5, 0.5], gallery_sizes=sizes, max_ratio=1,
                        probes=1, method="")
    checked, ratios, probes = [], [], 0
    for n in sizes:
        maxima = nonmated_maxima(unit, labels, n, reps, rng)
        probes = maxima.size
        for f in CHECK_FPIRS:
            if f * maxima.size < 2:  # fewer than two expected events: nothing to check against
                continue
            t = tail_threshold(candidate, f, n)
            measured = float(np.mean(maxima >= t))
            predicted = fpir_at(candidate, t, n)
            ratios.append(max(measured / predicted, predicted / max(measured, 1 / maxima.size)))
            checked.append(f)
    return candidate.model_copy(update=dict(
        fpir_range=[min(checked), max(checked)], max_ratio=float(max(ratios)), probes=int(probes),
        method=f"GPD (maximum likelihood) over the {impostor.size} all-vs-all impostor cosines above their "
               f"99th percentile; FPIR(t, N) = 1 - (1 - P(s >= t))^N checked against non-mated searches of "
               f"hold-out galleries of N identities (one random photo each; {reps} draws below the largest N) "
               f"at FPIR {', '.join(f'{f:g}' for f in CHECK_FPIRS)}"))


def calibrate_bands(genuine, impostor, gq, iq, fars=DEFAULT_FARS) -> list[QualityBand]:
    edges = [0.0, *(float(e) for e in np.quantile(iq, BAND_QUANTILES)), 1.0]
    bands = []
    for low, high in zip(edges[:-1], edges[1:]):
        top = high >= 1.0
        g = (gq >= low) & ((gq <= high) if top else (gq < high))
        i = (iq >= low) & ((iq <= high) if top else (iq < high))
        thresholds = {float(f): float(threshold_at_far(impostor[i], f)) for f in fars if f * i.sum() >= 10}
        bands.append(QualityBand(low=low, high=high, thresholds=thresholds, positive_pairs=int(g.sum()),
                                 negative_pairs=int(i.sum())))
    return bands


def calibrate_floors(genuine, gq, threshold: float, bins: int = 20, ratios=FLOOR_RATIOS) -> QualityFloors:
    edges = np.quantile(gq, np.linspace(0, 1, bins + 1))
    errors = np.array([np.mean(genuine[(gq >= lo) & (gq < hi)] < threshold) for lo, hi in zip(edges[:-1], edges[1:])])

    def floor(ratio: float) -> float:
        climbing = errors > ratio * np.median(errors)
        k = int(np.argmin(climbing)) if not climbing.all() else bins  # erring bins from the bottom
        return float(edges[k]) if k else 0.0

    return QualityFloors(probe=floor(ratios[0]), enrolment=floor(ratios[1]), rule=(
        f"genuine hold-out pairs in {bins} quantile bins of their lower quality; a floor is the upper edge of the "
        f"bins, counted from the bottom, failing the FAR 1e-3 threshold more than ratio x the median bin's rate "
        f"({np.median(errors):.3f}): ratio {ratios[0]} for probes, {ratios[1]} for enrolments (refused when no photo "
        f"reaches it); rates from the bottom: {', '.join(f'{e:.3f}' for e in errors[:6])}"))


def calibrate(card: ModelCard, emb: np.ndarray, labels: np.ndarray, dataset: str, fars=DEFAULT_FARS,
              method: str = "aligned hold-out crops through the card's engine (flip TTA as the card says)",
              set_quality: bool = False) -> ModelCard:
    norms = np.linalg.norm(emb, axis=1)
    if card.quality is None or set_quality:
        low, high = np.percentile(norms, [1, 99])
        card.quality = Quality(low=float(low), high=float(high))
    quality = quality_from_magnitude(card, norms)
    genuine, impostor, gq, iq = pair_scores(emb, labels, quality)
    thresholds = {float(f): float(threshold_at_far(impostor, f)) for f in fars if f * impostor.size >= 1}
    card.card_version = 2
    card.calibration = Calibration(
        thresholds=thresholds,
        dataset=dataset,
        positive_pairs=int(genuine.size),
        negative_pairs=int(impostor.size),
        method=f"{method}; all-vs-all pairs; threshold = lowest cosine accepting at most floor(FAR x impostor pairs) "
               "impostors; quality bands, floors and the open-set tail: training/calibrate.py",
        open_set=calibrate_open_set(emb, labels, impostor),
        quality_bands=calibrate_bands(genuine, impostor, gq, iq, fars),
        floors=calibrate_floors(genuine, gq, thresholds[1e-3]),
    )
    return card
