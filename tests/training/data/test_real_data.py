"""The folder dataset over the shared real data (counts from shared/README.md)."""
from __future__ import annotations

import pytest
import torch

from training.data import FolderFaceDataset

pytestmark = pytest.mark.data


def test_celeba_299(data_dir):
    ds = FolderFaceDataset(data_dir / "celeba-299")
    assert ds.num_classes == 299 and len(ds) == 6300
    x, y = ds[len(ds) - 1]
    assert x.shape == (3, 112, 112) and x.dtype == torch.float32 and y == 298
    assert -1.0 <= x.min() < x.max() <= 1.0


def test_celeba_10k_aligned(data_dir):
    root = data_dir / "celeba-10k-aligned"
    assert FolderFaceDataset(root).num_classes == 5429
    ds = FolderFaceDataset(root, min_images_per_class=2, crop=(0.1, 0.25, 0.9, 0.9))
    assert ds.num_classes == 2854
    assert ds[0][0].shape == (3, 112, 112)


def test_exclude_keeps_evaluation_identities_out(data_dir):
    held_out = FolderFaceDataset(data_dir / "celeba-299").classes
    ds = FolderFaceDataset(data_dir / "celeba-10k-aligned", exclude=held_out)
    assert ds.num_classes == 5429 - 167  # 167 identities are in both sets
    assert not set(ds.classes) & set(held_out)


def test_orl_grayscale_gives_three_channels(data_dir):
    ds = FolderFaceDataset(data_dir / "orl", size=None)
    assert ds.num_classes == 40 and len(ds) == 400
    x, _ = ds[0]
    assert x.shape == (3, 112, 92)
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])
