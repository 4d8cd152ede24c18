"""Precomputed features (training.caface.features) as frames, training sets and evaluation templates.

A frame is one (image, variant) pair: variant 0 the clean crop, 1.. one poor frame per degradation.

Training sets (`SetSampler`), per REFERENCE.md: an identity with at least two images, at most
`max_images` of its images (a random subset), and n ~ U{min_size … max_size} frames drawn from
them without repeating an (image, variant) pair. Each set draws its own clean fraction p ~ U(0, 1);
a frame is its image's clean crop with probability p, else one of its poor frames: the sets run
from all-clean to nearly all-poor, so the network sees both what to keep and what to down-weight.

Evaluation templates (`build_templates`): each identity's images (sorted) split into two disjoint
templates, even and odd positions; a CONDITIONS entry says which frames each image contributes.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from engines.registry import Registry


@dataclass
class Features:
    """Arrays of one features .npz: embedding (N, V, D), style (N, V, S), labels (N,), names."""

    embedding: np.ndarray
    style: np.ndarray
    labels: np.ndarray
    identities: np.ndarray
    paths: np.ndarray
    variants: tuple[str, ...]
    model: str

    @classmethod
    def load(cls, path: str | Path) -> Features:
        d = np.load(path)
        return cls(d["embedding"], d["style"], d["labels"], d["identities"], d["paths"],
                   tuple(str(v) for v in d["variants"]), str(d["model"]))

    def subset(self, keep_identity: np.ndarray) -> Features:
        """Only the images of identities whose keep_identity[label] is True (labels renumbered 0..C'−1)."""
        rows = keep_identity[self.labels]
        new_label = np.cumsum(keep_identity) - 1
        return Features(self.embedding[rows], self.style[rows], new_label[self.labels[rows]],
                        self.identities[keep_identity], self.paths[rows], self.variants, self.model)

    def by_identity(self) -> list[np.ndarray]:
        """Row indices of each identity's images, in path order."""
        order = np.argsort(self.labels, kind="stable")
        return np.split(order, np.cumsum(np.bincount(self.labels, minlength=len(self.identities)))[:-1])


def split_identities(identities: np.ndarray, every: int, protected: set[str] | None = None) -> np.ndarray:
    """A boolean mask (C,): every `every`-th identity (sorted order) among those in `protected` (or all) is True."""
    candidates = [k for k, name in enumerate(identities) if protected is None or str(name) in protected]
    mask = np.zeros(len(identities), bool)
    mask[candidates[::every]] = True
    return mask


class SetSampler:
    """Random training sets of frames; `sample(batch)` -> (image rows (F,), variants (F,), set index (F,), labels (B,))."""

    def __init__(self, features: Features, min_size: int = 2, max_size: int = 16, max_images: int = 32,
                 seed: int = 0, exclude_variants: Sequence[str] = ()) -> None:
        self.groups = [g for g in features.by_identity() if len(g) >= 2]
        self.labels = features.labels
        # the poor variants sets may use (exclude some to test generalisation to an unseen degradation)
        self.poor = np.array([k for k, v in enumerate(features.variants) if k and v not in set(exclude_variants)])
        self.min_size, self.max_size, self.max_images = min_size, max_size, max_images
        self.rng = np.random.default_rng(seed)

    def one_set(self, group: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rng = self.rng
        images = rng.permutation(group)[: self.max_images]
        n = int(rng.integers(self.min_size, self.max_size + 1))
        clean_fraction = rng.uniform()
        # a clean or a poor variant per frame, then distinct (image, variant) pairs
        wanted = np.where(rng.uniform(size=4 * n) < clean_fraction, 0, rng.choice(self.poor, size=4 * n))
        pairs = np.unique(np.stack([rng.integers(0, len(images), size=4 * n), wanted], 1), axis=0)
        pairs = pairs[rng.permutation(len(pairs))[:n]]  # (n', 2), n' ≤ n when the identity has few frames
        return images[pairs[:, 0]], pairs[:, 1]

    def sample(self, batch: int):
        picks = self.rng.integers(0, len(self.groups), size=batch)
        rows, variants, index = [], [], []
        for b, g in enumerate(picks):
            r, v = self.one_set(self.groups[g])
            rows.append(r), variants.append(v), index.append(np.full(len(r), b))
        labels = self.labels[[self.groups[g][0] for g in picks]]  # (B,)
        return np.concatenate(rows), np.concatenate(variants), np.concatenate(index), labels


# ---- evaluation templates -----------------------------------------------------------------

CONDITIONS: Registry = Registry("template condition")
Frames = Callable[[int, int, int], list[int]]  # (position in template, images in template, variants) -> variants


@CONDITIONS.register("clean")
def clean_frames(position: int, size: int, variants: int) -> list[int]:
    """Every image as its clean crop."""
    return [0]


@CONDITIONS.register("mixed")
def mixed_frames(position: int, size: int, variants: int) -> list[int]:
    """Every image as its clean crop and each of its poor frames (blurred, small, occluded, noisy): 1 good in 5."""
    return list(range(variants))


@CONDITIONS.register("one_good")
def one_good_frames(position: int, size: int, variants: int) -> list[int]:
    """The template's first image clean and poor, every other image only as its poor frames."""
    return list(range(variants)) if position == 0 else list(range(1, variants))


def _only(kind_index: int) -> Frames:
    def frames(position: int, size: int, variants: int) -> list[int]:
        return [0, kind_index]
    frames.__doc__ = "Every image clean and as its one poor frame of a single degradation: 1 good frame in 2."
    return frames


for _k, _kind in enumerate(("blur", "lowres", "occlude", "noise"), start=1):  # features.VARIANTS[1:]
    CONDITIONS.register(f"mixed_{_kind}")(_only(_k))


def build_templates(features: Features, condition: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(image rows (F,), variants (F,), template index (F,), template label (T,)) for identities with 2+ images."""
    frames = CONDITIONS.get(condition)
    rows, variants, index, labels = [], [], [], []
    for group in features.by_identity():
        if len(group) < 2:
            continue
        for half in (group[0::2], group[1::2]):
            t = len(labels)
            for pos, row in enumerate(half):
                for v in frames(pos, len(half), len(features.variants)):
                    rows.append(row), variants.append(v), index.append(t)
            labels.append(features.labels[group[0]])
    return np.array(rows), np.array(variants), np.array(index), np.array(labels)
