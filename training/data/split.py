"""Identity-disjoint train / hold-out splits of aligned folder-per-identity trees, as symlink trees.

Several sources (e.g. CelebA-299 and CelebA-10k crops) merge by identity folder name; every
`holdout_every`-th identity (in sorted order) with at least `min_holdout_images` images goes to
the hold-out tree (calibration, never trained on), the rest to the training tree. Identities in
`keep_in_train` never go to hold-out. Nothing is copied: each entry is a symlink to its crop.
"""
from __future__ import annotations

import os
from pathlib import Path

from training.data.folder import list_identities


def merged_identities(sources: list[Path]) -> dict[str, list[Path]]:
    merged: dict[str, dict[str, Path]] = {}
    for src in sources:
        for name, paths in list_identities(src).items():
            for p in paths:
                merged.setdefault(name, {}).setdefault(p.name, p)  # the same photo in two sources counts once
    return {name: sorted(files.values()) for name, files in merged.items()}


def split(sources: list[Path], train_dst: Path, holdout_dst: Path, holdout_every: int = 3, min_holdout_images: int = 2,
          keep_in_train: list[Path] = ()) -> tuple[int, int]:
    """Write both symlink trees; returns (train identities, hold-out identities)."""
    ids = merged_identities(sources)
    protected = {name for src in keep_in_train for name in list_identities(src)}
    candidates = [n for n in sorted(ids) if n not in protected and len(ids[n]) >= min_holdout_images]
    holdout = set(candidates[::holdout_every])
    for name, paths in ids.items():
        dst = (holdout_dst if name in holdout else train_dst) / name
        dst.mkdir(parents=True, exist_ok=True)
        for p in paths:
            link = dst / p.name
            if not link.exists():
                os.symlink(p.resolve(), link)
    return len(ids) - len(holdout), len(holdout)
