"""CAFace fusion for any recognition model card: `faceset model fuse DIR --data PHOTOS [--out DIR/fusion]`.

The default model's recipe (training/recipes/caface.sh) in one call, for a model faceset did not train:

1. a card without a style output gets one (engines.style_taps: a copy of its ONNX with intermediate
   maps tapped, written beside the card, which then points at it; the embedding is checked unchanged);
2. PHOTOS (a folder per person, raw photos) are aligned to the card's template and size (`faceset data align`);
3. per image and degradation, embedding and style through the card's engine (training.caface.features);
4. the same trainer as the default's (training.caface.train) with what the default's config fixes by
   hand read off these features instead (`fusion_config`);
5. export with parity (training.caface.export) to DIR/fusion, the card naming the data and no licence
   the user did not state;
6. (unless quality_head=False) a learned per-face quality for the model on the same features
   (training.caface.quality_head), named in its card as a candidate that `faceset model calibrate` checks.

`quality_head` alone runs steps 1-3 and 6: `faceset model quality-head DIR --data DIR`.

Work files (aligned crops, features, checkpoints) go to WORK; every step resumes from them.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from engines.fusion import FusionCard
from engines.model_card import ModelCard
from engines.style_taps import add_style_taps
from training.caface.config import CAFaceConfig, FeatureFiles, OptimConfig
from training.caface.export import export_fusion
from training.caface.features import precompute
from training.caface.loss import frame_quality_targets
from training.caface.model import FusionArch
from training.caface.quality_head import attach_quality_head
from training.caface.sets import Features
from training.caface.train import train
from training.data.align_tool import align_folder

log = logging.getLogger("faceset.caface.fuse")

MAGNITUDE_PERCENTILES = (1.0, 99.0)
FRAME_QUALITY_PERCENTILES = (10.0, 90.0)


def magnitude_percentiles(features: Features) -> tuple[float, float]:
    """(low, high): the 1st and 99th percentiles of every frame's magnitude (clean and degraded)."""
    low, high = np.percentile(np.linalg.norm(features.embedding, axis=2), MAGNITUDE_PERCENTILES)
    return float(low), float(high)


def frame_quality_percentiles(features: Features) -> tuple[float, float]:
    """(a, b): the 10th and 90th percentiles of the frames' cosines to their person's other clean photos.

    The default's config fixes (0.88, 0.97) from its model's cosines (clean median 0.946, occluded 0.884);
    another model's cosines lie elsewhere, so the frame quality's target is stretched over its own."""
    counts = np.bincount(features.labels, minlength=len(features.identities))
    rows = counts[features.labels] >= 2  # a single photo has no other photos to be compared with
    cos = frame_quality_targets(features.embedding[rows], features.labels[rows], len(features.identities), 0.0, 1.0)
    a, b = np.percentile(cos, FRAME_QUALITY_PERCENTILES)
    return float(a), float(b)


def fusion_config(card: ModelCard, features_path: Path, features: Features, steps: int, batch_sets: int,
                  eval_every: int, threads: int = 1, seed: int = 0) -> CAFaceConfig:
    """The default's architecture and optimiser, sized to these features; magnitudes normalised by the card's
    quality range where it has one, else by the features' magnitude percentiles."""
    arch = FusionArch(embedding_size=features.embedding.shape[-1], style_size=features.style.shape[-1],
                      frame_quality_range=frame_quality_percentiles(features))
    return CAFaceConfig(
        name=f"fuse-{card.name}", recognition_card=str(card.root),
        # a learned quality's range is of its head's scores, not of magnitudes
        magnitude_range=None if card.quality and card.quality.method == "magface_linear" else magnitude_percentiles(features),
        features=FeatureFiles(train=str(features_path.resolve()), eval_every=eval_every, eval_protected=None),
        arch=arch, optim=OptimConfig(warmup_steps=min(100, steps // 10)), steps=steps, batch_sets=batch_sets,
        seed=seed, threads=threads, log_every=max(1, min(100, steps // 10)), checkpoint_every=min(500, steps))


def card_overrides(card: ModelCard, data: Path, features: Features, licence: str | None) -> dict:
    """What the fusion card says of its data and terms: the user's data, and only the licence they stated."""
    where = f"{len(features.identities)} identities, {len(features.labels)} photos of {data}"
    return {
        "training": {
            "data": f"features of {card.name} {card.version} on {where} (aligned to {card.input.template} by "
                    f"faceset's MTCNN), each photo clean and as 4 poor frames (blur, low resolution, occlusion, noise)",
            "licence": f"not stated: the terms of the photos in {data}",
            "recipe": "faceset model fuse",
        },
        "licence": licence or (f"not stated (faceset model fuse --licence): derived from {card.name} {card.version} "
                               f"(licence: {card.licence}) and from features of the photos in {data}; their terms apply"),
    }


def model_features(model_dir: Path, data: Path, work: Path, taps: list[str] | None = None,
                   threads: int = 1) -> tuple[ModelCard, Path]:
    """Steps 1-3 of the module docstring: (the card, with its style output; the features file in work)."""
    card = ModelCard.load(model_dir)
    if card.outputs.style is None:
        card = add_style_taps(card, taps=taps)
        log.info("style output added: channels %s, %s", card.outputs.style_channels, card.files.onnx.path)
    elif taps:
        raise ValueError(f"{model_dir} already has the style output {card.outputs.style!r}; --taps would not be used")
    report = align_folder(data, work / "aligned", card.input.template, card.input.size, threads=threads)
    log.info("aligned %d photos (%d without a face)", report.aligned + report.skipped, report.no_face)
    return card, precompute(work / "aligned", work / "features.npz", model_dir, threads=threads)


def fuse(model_dir: Path, data: Path, work: Path, out: Path | None = None, taps: list[str] | None = None,
         steps: int = 3000, batch_sets: int = 64, eval_every: int = 8, licence: str | None = None,
         threads: int = 1, command: str | None = None, quality_head: bool = True) -> FusionCard:
    """Steps 1-6 of the module docstring; returns the fusion card written to `out` (default model_dir/fusion)."""
    card, features_path = model_features(model_dir, data, work, taps, threads)
    features = Features.load(features_path)
    cfg = fusion_config(card, features_path, features, steps, batch_sets, eval_every, threads)
    checkpoint = train(cfg, work / "run")
    fusion = export_fusion(checkpoint, out or model_dir / "fusion", model_dir, f"{card.name}-caface", "1",
                           features_path, command, card_overrides(card, data, features, licence))
    if quality_head:  # after the fusion: the head changes no file the fusion card pins (the recognition ONNX)
        attach_quality_head(model_dir, features_path, str(data), eval_every, command=command)
    return fusion


def quality_head(model_dir: Path, data: Path, work: Path, taps: list[str] | None = None, steps: int = 1500,
                 eval_every: int = 8, threads: int = 1, command: str | None = None) -> ModelCard:
    """Steps 1-3 and 6 of the module docstring: the model's card with its learned quality head."""
    _, features_path = model_features(model_dir, data, work, taps, threads)
    return attach_quality_head(model_dir, features_path, str(data), eval_every, steps, command=command)
