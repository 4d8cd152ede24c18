"""Build the training dataset a config's `data` section describes."""
from __future__ import annotations

from pathlib import Path

import logging

from training.data import DATASETS
from training.data.transforms import build_transforms

log = logging.getLogger("faceset.data")


def prepare_aligned(src: Path, dst: Path, template: str, pick: str = "largest") -> None:
    """Detect and align raw photos into dst (skips what is done already), so a recipe runs from raw data."""
    from training.data.align_tool import align_folder

    report = align_folder(src, dst, template=template, pick=pick)
    log.info("aligned %s -> %s: %s", src, dst, report)


def build_train_dataset(cfg, base_dir: Path, seed: int = 0):
    """cfg is training.config.DataConfig; a relative root is taken under base_dir (settings.base_dir(cfg.base))."""
    root = Path(cfg.root).expanduser()
    root = root if root.is_absolute() else Path(base_dir) / root
    return DATASETS.build(
        cfg.kind,
        root=root,
        size=cfg.size,
        crop=cfg.crop,
        min_images_per_class=cfg.min_images_per_class,
        max_classes=cfg.max_classes,
        exclude=cfg.exclude,
        transform=build_transforms(cfg.augment),
    )
