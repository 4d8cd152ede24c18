"""Folder-per-identity trees and the identity-disjoint train / hold-out split (torch-free).

A tree is root/<identity>/*.{jpg,jpeg,png,pgm,webp}. Several sources (e.g. CelebA-299 and CelebA-10k
crops) merge by identity folder name; every `every`-th identity (in sorted order) with at least
`min_images` images is held out (calibration, never trained on), the rest trains. Identities in
`keep_in_train` never go to hold-out. `split` writes both as symlink trees: nothing is copied.
Training's datasets and `faceset data split` use this, and so do calibration and the benchmarks
that rebuild the hold-out from the raw folders (benchmarks/open_set.py).
"""
from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".pgm", ".webp"})


def list_identities(root: Path) -> dict[str, list[Path]]:
    """identity name -> its sorted image paths, for every sub-folder of root holding an image."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder not found: {root}")
    found: dict[str, list[Path]] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        if images:
            found[folder.name] = images
    return found


def merged_identities(sources: list[Path]) -> dict[str, list[Path]]:
    merged: dict[str, dict[str, Path]] = {}
    for src in sources:
        for name, paths in list_identities(src).items():
            for p in paths:
                merged.setdefault(name, {}).setdefault(p.name, p)  # the same photo in two sources counts once
    return {name: sorted(files.values()) for name, files in merged.items()}


def holdout_names(ids: dict[str, list[Path]], protected: Iterable[str] = (), every: int = 3,
                  min_images: int = 2) -> set[str]:
    """The held-out identities of `ids`: every `every`-th eligible name in sorted order."""
    protected = set(protected)
    candidates = [n for n in sorted(ids) if n not in protected and len(ids[n]) >= min_images]
    return set(candidates[::every])


def split(sources: list[Path], train_dst: Path, holdout_dst: Path, holdout_every: int = 3, min_holdout_images: int = 2,
          keep_in_train: list[Path] = ()) -> tuple[int, int]:
    """Write both symlink trees; returns (train identities, hold-out identities)."""
    ids = merged_identities(sources)
    protected = {name for src in keep_in_train for name in list_identities(src)}
    holdout = holdout_names(ids, protected, holdout_every, min_holdout_images)
    for name, paths in ids.items():
        dst = (holdout_dst if name in holdout else train_dst) / name
        dst.mkdir(parents=True, exist_ok=True)
        for p in paths:
            link = dst / p.name
            if not link.exists():
                os.symlink(p.resolve(), link)
    return len(ids) - len(holdout), len(holdout)
