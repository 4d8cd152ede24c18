"""Calibrate a model card on held-out identities: verification thresholds at FARs, the open-set tail model, and
a quality only where one is validated.

Torch-free: photos go through the serving pipeline (engines' detector, alignment and the card's engine), or
aligned crops straight to the engine (`aligned=True`). Every pair of faces is scored: same identity = genuine,
other identities = impostor (all-vs-all). The threshold at FAR f is the lowest cosine accepting at most
⌊f·impostors⌋ impostor pairs (engines.error_rates.threshold_at_far).

Quality, honestly. A card reports quality only from a validated source (engines.quality_sources): the magnitude
‖f‖ of a MagFace-trained model (the card's `magnitude` section says it was trained so), or the card's learned
quality head (`quality_head`, fed the faces' style statistics: photos and aligned crops, not cached embeddings).
Each source the card offers is checked on the same pairs by an error-versus-reject curve (engines.error_rates,
threshold at FMR 1e-3 set once on all pairs, the operating point the floors use): FNMR with 0, 10 and 20 % of
the lowest-quality pairs (by the pair's lower score) rejected. A source is used only when rejecting 20 % lowers
FNMR by at least QUALITY_MIN_GAIN (relative); of two that pass, the one with the lower FNMR at 20 %. Every curve
is recorded in the card (`Calibration.quality_checks`). Otherwise the card's `quality` is null: no quality
bands, no floors, and the service reports `quality: null` and gates nothing on it.

A validated card without a quality mapping of that source gets one (scores mapped linearly between their 1st
and 99th percentiles on the same faces); a card that has one keeps it (unless `set_quality`): the mapping is part
of the model, not of its calibration (stored gallery and template qualities, and the CAFace fusion model trained
on it, depend on it).

Card version 2 adds, from the same faces (ModelCard's OpenSet, QualityBand, QualityFloors):
  open set   engines.open_set: a generalised Pareto tail of the impostor cosines and the number of
             independent comparisons k(N) a search of N identities amounts to, fitted to the best impostor
             score of non-mated searches in galleries of N held-out identities (one photo each, drawn at
             random; the largest N is every other identity); FPIR(t, N) = 1 − (1 − P(s ≥ t))^k(N).
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

from engines.base import EMBEDDING, STYLE, build_engine, run_aligned
from engines.error_rates import error_versus_reject, threshold_at_far
from engines.holdout import list_identities
from engines.model_card import Calibration, ModelCard, Quality, QualityBand, QualityCheck, QualityFloors
from engines.open_set import calibrate_open_set
from engines.quality_sources import QUALITY_SOURCES, candidates, mapped, mapping

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)
BAND_QUANTILES = (0.5, 0.8, 0.95)  # of the impostor pairs' lower quality
FLOOR_RATIOS = (1.25, 1.5)  # probes, enrolments
QUALITY_FMR = 1e-3
QUALITY_REJECT = (0.0, 0.1, 0.2)
# a source whose worst 20 % of pairs hold no more than their share of errors would turn faces away for nothing;
# 10 % fewer errors is about three standard errors on a hold-out of ~2,000 genuine pairs at FNMR 0.3
QUALITY_MIN_GAIN = 0.1


# ---- embeddings of a hold-out tree ----------------------------------------------------------------------------------


def _stacked(rows: list[dict[str, np.ndarray]], card: ModelCard) -> tuple[np.ndarray, np.ndarray | None]:
    """(raw embeddings (N, D), style statistics (N, S) or None) of per-batch engine outputs."""
    emb = np.concatenate([np.zeros((0, card.embedding_size), np.float32), *(r[EMBEDDING] for r in rows)])
    style = [r[STYLE] for r in rows if STYLE in r]
    return emb, (np.concatenate(style) if style and len(style) == len(rows) else None)


def embed_aligned_tree(card: ModelCard, root: Path, threads: int = 0,
                       batch: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Raw embeddings (N, D), integer identity labels (N,) and style statistics (N, S; None without a style
    output) of every aligned crop under root/<identity>/."""
    engine = build_engine("onnxruntime", card=card, intra_op_threads=threads)
    paths = [(p, label) for label, (_, ps) in enumerate(sorted(list_identities(root).items())) for p in ps]
    out = []
    for i in range(0, len(paths), batch):
        faces = np.stack([np.asarray(Image.open(p).convert("RGB")) for p, _ in paths[i : i + batch]])
        out.append(run_aligned(engine, card, faces))
    emb, style = _stacked(out, card)
    return emb, np.array([label for _, label in paths], dtype=np.int64), style


def embed_photo_tree(card: ModelCard, root: Path, threads: int = 0,
                     detect_max_side: int = 1280) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """(raw embeddings, labels, photos without a face, style statistics or None) of the largest face of every
    photo under root/<identity>/, through the serving pipeline (the shipped MTCNN, alignment to the card's
    template, the card's engine)."""
    from engines.detection import build_detector
    from engines.pipeline import FacePipeline

    pipeline = FacePipeline(build_detector("mtcnn", intra_op_threads=threads),
                            build_engine("onnxruntime", card=card, intra_op_threads=threads), card, detect_max_side)
    out, labels, missed = [], [], 0
    for label, (_, paths) in enumerate(sorted(list_identities(root).items())):
        for p in paths:
            image = np.asarray(Image.open(p).convert("RGB"))
            found = pipeline.detect(image, max_faces=1)
            if not found:
                missed += 1
                continue
            out.append(run_aligned(pipeline.engine, card, pipeline.align(image, found)))
            labels.append(label)
    emb, style = _stacked(out, card)
    return emb, np.unique(labels, return_inverse=True)[1] if labels else np.zeros(0, np.int64), missed, style


# ---- pairs ----------------------------------------------------------------------------------------------------------


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


# ---- quality: validated or none -------------------------------------------------------------------------------------


def check_quality(source: str, genuine: np.ndarray, impostor: np.ndarray, gq: np.ndarray, iq: np.ndarray,
                  fmr: float = QUALITY_FMR, reject=QUALITY_REJECT, min_gain: float = QUALITY_MIN_GAIN) -> QualityCheck:
    """The error-versus-reject check of a per-face quality (pairs by their lower quality gq, iq): used when
    rejecting the largest fraction lowers FNMR by at least `min_gain` of its value with nothing rejected."""
    curve = error_versus_reject(np.concatenate([genuine, impostor]),
                                np.concatenate([np.ones(genuine.size, bool), np.zeros(impostor.size, bool)]),
                                np.concatenate([gq, iq]), fmr, np.asarray(reject, np.float64), fixed_threshold=True)
    fnmr = [float(f) for f in curve.fnmr]
    used = bool(fnmr[0] > 0 and fnmr[-1] <= (1 - min_gain) * fnmr[0])
    return QualityCheck(source=source, fmr=fmr, reject=[float(r) for r in reject], fnmr=fnmr, min_gain=min_gain,
                        genuine_pairs=int(genuine.size), impostor_pairs=int(impostor.size), used=used)


def validated_quality(card: ModelCard, emb: np.ndarray, labels: np.ndarray, scores: dict[str, np.ndarray],
                      set_quality: bool = False) -> tuple[Quality | None, list[QualityCheck], tuple | None]:
    """(the card's quality mapping or None, the checks made, the chosen source's pair scores (gs, is): each pair's
    lower score) from the per-face scores of the candidate sources (engines.quality_sources.candidates: a plain
    model's norm is none, it was never trained to mean anything). The mapping is the card's own where it maps the
    chosen source, unless `set_quality`."""
    checks, lower = [], {}
    for source, s in scores.items():
        genuine, impostor, gs, is_ = pair_scores(emb, labels, s)
        checks.append(check_quality(source, genuine, impostor, gs, is_))
        lower[source] = gs, is_
    passed = [c for c in checks if c.used]
    if not passed:
        return None, [c.model_copy(update=dict(used=False)) for c in checks], None
    best = min(passed, key=lambda c: c.fnmr[-1])
    checks = [c.model_copy(update=dict(used=c is best)) for c in checks]  # used: the card's source, only one
    keep = card.quality is not None and card.quality.method == QUALITY_SOURCES.get(best.source).method
    quality = card.quality if keep and not set_quality else mapping(best.source, scores[best.source])
    return quality, checks, lower[best.source]


# ---- open set, bands, floors ----------------------------------------------------------------------------------------


def calibrate_bands(genuine, impostor, gq, iq, fars=DEFAULT_FARS) -> list[QualityBand]:
    """FAR thresholds per band of the pair's lower quality; none (the overall thresholds serve) where a band holds
    too few impostor pairs to measure even the loosest FAR (a small hold-out)."""
    edges = [0.0, *(float(e) for e in np.quantile(iq, BAND_QUANTILES)), 1.0]
    bands = []
    for low, high in zip(edges[:-1], edges[1:]):
        top = high >= 1.0
        g = (gq >= low) & ((gq <= high) if top else (gq < high))
        i = (iq >= low) & ((iq <= high) if top else (iq < high))
        thresholds = {float(f): float(threshold_at_far(impostor[i], f)) for f in fars if f * i.sum() >= 10}
        if not thresholds:
            return []
        bands.append(QualityBand(low=low, high=high, thresholds=thresholds, positive_pairs=int(g.sum()),
                                 negative_pairs=int(i.sum())))
    return bands


def calibrate_floors(genuine, gq, threshold: float, bins: int = 20, ratios=FLOOR_RATIOS) -> QualityFloors:
    # qualities clipped to 0 (or 1) tie: their quantile edges merge, else their bins would be empty (NaN rates)
    edges = np.unique(np.quantile(gq, np.linspace(0, 1, bins + 1)))
    bins = len(edges) - 1
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


# ---- the card -------------------------------------------------------------------------------------------------------


def calibrate(card: ModelCard, emb: np.ndarray, labels: np.ndarray, dataset: str, fars=DEFAULT_FARS,
              method: str = "aligned hold-out crops through the card's engine (flip TTA as the card says)",
              set_quality: bool = False, command: str | None = None, style: np.ndarray | None = None) -> ModelCard:
    """The card with its calibration (and its quality: validated, else null) measured on raw embeddings (N, D) of
    held-out identities `labels` (N,) and, for a learned quality head, their style statistics (N, S); `command`:
    the command line that asked for it, recorded."""
    genuine, impostor = pair_scores(emb, labels)
    thresholds = {float(f): float(threshold_at_far(impostor, f)) for f in fars if f * impostor.size >= 1}
    scores = candidates(card, {EMBEDDING: emb, STYLE: style})
    quality, checks, lower = validated_quality(card, emb, labels, scores, set_quality)
    bands, floors = [], None
    if quality is not None:  # the mapping is monotone: a pair's lower quality is its lower score's
        gq, iq = mapped(quality, lower[0]), mapped(quality, lower[1])
        bands, floors = calibrate_bands(genuine, impostor, gq, iq, fars), calibrate_floors(genuine, gq, thresholds[1e-3])
    calibration = Calibration(
        thresholds=thresholds,
        dataset=dataset,
        positive_pairs=int(genuine.size),
        negative_pairs=int(impostor.size),
        method=f"{method}; all-vs-all pairs; threshold = lowest cosine accepting at most floor(FAR x impostor pairs) "
               "impostors; quality check, bands, floors and the open-set tail: engines/calibration.py",
        open_set=calibrate_open_set(emb, labels),
        quality_checks=checks,
        quality_bands=bands,
        floors=floors,
        command=command,
    )
    # quality and calibration change together (the card refuses bands without a quality): one copy, validated whole
    out = card.model_copy(update=dict(card_version=2, quality=quality, calibration=calibration))
    ModelCard.model_validate(out.model_dump())
    return out


def calibrate_folder(card_path: Path, holdout: Path, dataset: str, aligned: bool = False, threads: int = 0,
                     set_quality: bool = False, command: str | None = None) -> ModelCard:
    """Calibrate the card at `card_path` on a folder per held-out identity (raw photos through the pipeline, or
    aligned crops) and rewrite it atomically."""
    card = ModelCard.load(card_path)
    if aligned:
        emb, labels, style = embed_aligned_tree(card, holdout, threads)
        method = "aligned hold-out crops through the card's engine (flip TTA as the card says)"
    else:
        emb, labels, missed, style = embed_photo_tree(card, holdout, threads)
        method = (f"raw hold-out photos through the serving pipeline (MTCNN, alignment, the card's engine, flip TTA "
                  f"as the card says), the largest face of each ({missed} photos without a face left out)")
    if len(np.unique(labels)) < 3:
        raise ValueError(f"{holdout}: calibration needs faces of at least 3 identities, found {len(np.unique(labels))}")
    card = calibrate(card, emb, labels, dataset, method=method, set_quality=set_quality, command=command, style=style)
    card.save(card_path)
    return card


def calibrate_embeddings(card_path: Path, embeddings: Path, dataset: str, set_quality: bool = False,
                         command: str | None = None) -> ModelCard:
    """Calibrate the card at `card_path` on a hold-out's cached pipeline embeddings (.npz: `embedding` (N, D) raw,
    NaN rows for photos without a face, and `identity` (N,); `benchmarks/open_set.py embed` writes them) and
    rewrite it atomically."""
    card = ModelCard.load(card_path)
    data = np.load(embeddings)
    found = ~np.isnan(data["embedding"][:, 0])
    labels = np.unique(data["identity"][found], return_inverse=True)[1]
    method = (f"hold-out embeddings computed through the serving pipeline ({embeddings.name}; "
              f"{int((~found).sum())} photos without a face left out)")
    card = calibrate(card, data["embedding"][found], labels, dataset, method=method, set_quality=set_quality,
                     command=command)
    card.save(card_path)
    return card
