"""Template-to-template verification: CAFace fusion vs the mean of normalised embeddings vs the magnitude-weighted mean.

    faceset caface evaluate models/caface --features runs/caface/features/celeba-holdout.npz \\
        [--subset runs/caface/features/celeba-train.npz:runs/celeba-caface/eval_identities.txt] \\
        [--json runs/celeba-caface/evaluation.json]

Each --features file (all its identities) and each --subset file (only the identities listed) is one
evaluation set. Every identity with 2+ images gives two disjoint templates (its images
at even and odd positions, training.caface.sets.build_templates); all template pairs are scored
(cosine of the fused features), TAR at each FAR whose FAR·impostors ≥ 1 (training.eval.set_verification).
Conditions (training.caface.sets.CONDITIONS): "clean" (every image clean), "mixed" (every image clean
and as its 4 poor frames: 1 good frame in 5), "one_good" (one clean image per template, every image
as its 4 poor frames), "mixed_KIND" (every image clean and as its KIND frame only). The "clean-only mean" row fuses only the template's clean frames: an oracle
that knows which frames are good, for reference. CAFace runs through the exported ONNX graphs
(engines.fusion), as the service would. Numpy + ONNX Runtime only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from engines.fusion import FusionModel
from training.caface.sets import CONDITIONS, Features, build_templates
from training.eval.set_verification import FUSIONS, template_tar_at_far

FARS = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
Fuser = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


def baseline(name: str) -> Fuser:
    """A training.eval.set_verification fusion of each template's frames: (fused (T, D), quality (T,) NaN)."""
    fusion = FUSIONS.get(name)

    def fuse(raw, style, index, variants):
        t = index.max() + 1
        return np.stack([fusion(raw[index == k]) for k in range(t)]), np.full(t, np.nan)
    return fuse


def clean_only(raw, style, index, variants):
    """Mean of the template's clean frames only (an oracle that knows which frames are good)."""
    keep = variants == 0
    return baseline("mean")(raw[keep], style[keep], index[keep], variants[keep])


def caface(model: FusionModel) -> Fuser:
    def fuse(raw, style, index, variants):
        frames = model.assign(raw, style)
        t, m = index.max() + 1, model.clusters
        a = frames.assignment.astype(np.float64)  # (F, M)
        sums = np.zeros((t, m, raw.shape[1]))
        style_sums = np.zeros((t, m, frames.style.shape[1]))
        counts = np.zeros((t, m))
        np.add.at(sums, index, a[:, :, None] * frames.unit_embedding[:, None])  # (F, M, D) summed per template
        np.add.at(style_sums, index, a[:, :, None] * frames.style[:, None])
        np.add.at(counts, index, a)
        fused = [model.aggregate(sums[k], style_sums[k], counts[k]) for k in range(t)]
        return np.stack([f.embedding for f in fused]), np.array([f.quality for f in fused])
    return fuse


def evaluate_set(features: Features, fusers: dict[str, Fuser], conditions: Sequence[str], fars=FARS) -> list[dict]:
    rows = []
    for condition in conditions:
        images, variants, index, labels = build_templates(features, condition)
        raw, style = features.embedding[images, variants], features.style[images, variants]
        for name, fuser in fusers.items():
            if name == "clean-only mean" and condition == "clean":
                continue
            fused, quality = fuser(raw, style, index, variants)
            result = template_tar_at_far(fused, np.arange(len(labels)), labels=labels, fars=fars)
            rows.append({"condition": condition, "fusion": name, "templates": len(labels),
                         "frames_per_template": len(images) / len(labels), "genuine": result.n_genuine,
                         "impostors": result.n_impostors, "tar": result.as_dict(),
                         "mean_quality": float(np.nanmean(quality)) if np.isfinite(quality).any() else None})
    return rows


def markdown(title: str, rows: list[dict], fars=FARS) -> str:
    shown = [f for f in fars if any(np.isfinite(r["tar"][f"{f:g}"]) for r in rows)]
    head = "| condition | fusion | " + " | ".join(f"TAR@FAR {f:g}" for f in shown) + " | template quality |"
    lines = [f"**{title}**", "", head, "|" + " --- |" * (len(shown) + 3)]
    for r in rows:
        tars = " | ".join(f"{100 * r['tar'][f'{f:g}']:.2f}" for f in shown)
        quality = f"{r['mean_quality']:.3f}" if r["mean_quality"] is not None else "—"
        lines.append(f"| {r['condition']} ({r['templates']} templates, {r['frames_per_template']:.1f} frames) "
                     f"| {r['fusion']} | {tars} | {quality} |")
    return "\n".join(lines)


def load_set(path: Path, identities: Path | None) -> tuple[str, Features]:
    features = Features.load(path)
    if identities is None:
        return path.stem, features
    keep = set(identities.read_text().split())
    return f"{path.stem} ∩ {identities.name}", features.subset(np.array([str(n) in keep for n in features.identities]))


def evaluate_sets(fusion: Path, sets: Sequence[tuple[Path, Path | None]], conditions: Sequence[str]
                  ) -> Iterator[tuple[str, Features, list[dict]]]:
    """Each (features .npz, identities file or None) set's name, features and rows, as each is done."""
    for condition in conditions:  # an unknown name fails now, not after the first set's minutes
        CONDITIONS.get(condition)
    model = FusionModel.load(fusion)
    fusers = {"mean": baseline("mean"), "magnitude-weighted": baseline("magnitude"), "CAFace": caface(model),
              "clean-only mean": clean_only}
    for path, identities in sets:
        name, features = load_set(path, identities)
        yield name, features, evaluate_set(features, fusers, conditions)
