from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import DATASETS, FolderFaceDataset, build_dataset
from tests.training.data.images import expected_tensor, image_array


def test_classes_sorted_and_labelled(png_tree):
    root, content = png_tree
    ds = FolderFaceDataset(root, size=None)
    assert ds.classes == ["a", "b", "c"]  # sorted; the empty folder and the .txt are ignored
    assert ds.num_classes == 3
    assert [(p.parent.name, p.name, y) for p, y in ds.samples] == [
        ("a", "0.png", 0), ("a", "1.png", 0), ("b", "0.png", 1), ("b", "1.png", 1), ("b", "2.png", 1), ("c", "0.png", 2),
    ]
    assert ds.targets == [0, 0, 1, 1, 1, 2]


def test_items_are_normalised_rgb(png_tree):
    root, content = png_tree
    ds = FolderFaceDataset(root, size=None)
    x, y = ds[3]  # b/1.png
    assert y == 1 and x.dtype == torch.float32 and x.shape == (3, 24, 20)
    np.testing.assert_allclose(x.numpy(), expected_tensor(content["b"][1]), atol=1e-6)


def test_filters(png_tree):
    root, _ = png_tree
    assert FolderFaceDataset(root, min_images_per_class=2).classes == ["a", "b"]
    assert FolderFaceDataset(root, max_classes=2).classes == ["a", "b"]
    kept = FolderFaceDataset(root, exclude=["a"])
    assert kept.classes == ["b", "c"] and kept.targets == [0, 0, 0, 1]  # labels stay contiguous
    with pytest.raises(ValueError, match="no identity"):
        FolderFaceDataset(root, min_images_per_class=4)


def test_crop_box_cuts_the_relative_region(tmp_path):
    arr = image_array(7, h=50, w=40)
    (tmp_path / "id").mkdir()
    Image.fromarray(arr).save(tmp_path / "id" / "x.png")
    crop = (0.25, 0.2, 0.75, 0.8)  # pixels: x 10..30, y 10..40
    want = expected_tensor(arr[10:40, 10:30])
    cut = FolderFaceDataset(tmp_path, size=None, crop=crop)[0][0]
    np.testing.assert_allclose(cut.numpy(), want, atol=1e-6)
    # resizing the box to its own size samples it at scale 1, which must not change a pixel
    same = FolderFaceDataset(tmp_path, size=20, crop=(0.25, 0.3, 0.75, 0.7))[0][0]
    np.testing.assert_allclose(same.numpy(), expected_tensor(arr[15:35, 10:30]), atol=1e-6)


def test_resize_to_square(png_tree):
    root, _ = png_tree
    x, _ = FolderFaceDataset(root, size=112)[0]
    assert x.shape == (3, 112, 112) and x.min() >= -1 and x.max() <= 1


def test_bad_crop_rejected(png_tree):
    with pytest.raises(ValueError, match="crop"):
        FolderFaceDataset(png_tree[0], crop=(0.5, 0.0, 0.4, 1.0))


def test_grayscale_becomes_three_equal_channels(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, size=(12, 10), dtype=np.uint8)
    (tmp_path / "s1").mkdir()
    Image.fromarray(gray, mode="L").save(tmp_path / "s1" / "1.pgm")
    x, _ = FolderFaceDataset(tmp_path, size=None)[0]
    want = (gray.astype(np.float64) - 127.5) / 127.5
    for c in range(3):
        np.testing.assert_allclose(x[c].numpy(), want, atol=1e-6)


def test_transform_is_applied(png_tree):
    flipped = FolderFaceDataset(png_tree[0], size=None, transform=lambda x: x.flip(-1))[0][0]
    plain = FolderFaceDataset(png_tree[0], size=None)[0][0]
    assert torch.equal(flipped, plain.flip(-1)) and not torch.equal(flipped, plain)


def test_pickles_and_registers(png_tree):
    ds = build_dataset("folder", root=png_tree[0], size=None)
    assert "folder" in DATASETS and "recordio" in DATASETS
    clone = pickle.loads(pickle.dumps(ds))
    assert torch.equal(clone[4][0], ds[4][0]) and clone.samples == ds.samples
