"""Calibrate a model card on held-out identities: verification thresholds at FARs, and the quality range.

Torch-free: the exported ONNX runs through the card's engine on aligned crops of identities never
trained on (training.data.split). Every pair of crops is scored: same identity = genuine, other
identities = impostor (all-vs-all). The threshold at FAR f is the lowest cosine accepting at most
⌊f·impostors⌋ impostor pairs (training.eval.pairs.threshold_at_far). Quality maps magnitudes
linearly between their 1st and 99th percentiles on the same crops.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from engines.base import build_engine, embed_aligned
from engines.model_card import Calibration, ModelCard, Quality
from training.data.folder import list_identities
from training.eval.pairs import threshold_at_far

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)


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


def pair_scores(emb: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(genuine, impostor) cosines over all unordered pairs."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    sim = unit @ unit.T  # (N, N)
    iu = np.triu_indices(len(emb), k=1)
    same = labels[iu[0]] == labels[iu[1]]
    s = sim[iu]
    return s[same], s[~same]


def calibrate(card: ModelCard, emb: np.ndarray, labels: np.ndarray, dataset: str, fars=DEFAULT_FARS) -> ModelCard:
    genuine, impostor = pair_scores(emb, labels)
    thresholds = {float(f): float(threshold_at_far(impostor, f)) for f in fars if f * impostor.size >= 1}
    norms = np.linalg.norm(emb, axis=1)
    low, high = np.percentile(norms, [1, 99])
    card.calibration = Calibration(
        thresholds=thresholds,
        dataset=dataset,
        positive_pairs=int(genuine.size),
        negative_pairs=int(impostor.size),
        method="aligned hold-out crops through the card's engine (flip TTA as the card says); all-vs-all pairs; "
        "threshold = lowest cosine accepting at most floor(FAR x impostor pairs) impostors",
    )
    card.quality = Quality(low=float(low), high=float(high))
    return card
