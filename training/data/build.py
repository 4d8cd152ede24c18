"""Build the training dataset a config's `data` section describes."""
from __future__ import annotations

from pathlib import Path

from training.data import DATASETS
from training.data.transforms import build_transforms


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
