"""Folder-per-identity datasets: root/<identity>/*.{jpg,jpeg,png,pgm,webp}.

Identities are sorted by folder name (plain string order) and numbered 0..C−1 after filtering,
so the same folder and options always give the same labels. Only paths are held, so the dataset
pickles cleanly into DataLoader workers and works with DistributedSampler.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch.utils.data import Dataset

from engines.holdout import IMAGE_EXTENSIONS, list_identities  # noqa: F401 (re-exported)
from training.data import DATASETS
from training.data.transforms import Preprocess

def select_identities(
    counts: Mapping[str, int],
    min_images_per_class: int = 1,
    max_classes: int | None = None,
    exclude: Iterable[str] = (),
) -> list[str]:
    """The identities (name -> image count, in label order) kept: enough images, not excluded, at most
    max_classes, in their given order. The one filter of every dataset kind."""
    excluded = set(exclude)
    kept = [name for name, n in counts.items() if name not in excluded and n >= min_images_per_class]
    return kept if max_classes is None else kept[:max_classes]


@DATASETS.register("folder")
class FolderFaceDataset(Dataset):
    """Map-style dataset over root/<identity>/<image>, yielding (float32 (3, size, size), label).

    Args:
        root: folder with one sub-folder per identity.
        size: output side in pixels (None keeps each image's own size, only sensible when uniform).
        crop: (left, top, right, bottom) box in fractions of the image cut out before resizing;
            None uses the whole image.
        min_images_per_class: drop identities with fewer images.
        max_classes: keep only the first this many identities (after the other filters).
        exclude: identity names to leave out (e.g. evaluation identities).
        transform: augmentation applied to the normalised tensor (see transforms.build_transforms).
    """

    def __init__(
        self,
        root: str | Path,
        size: int | None = 112,
        crop: Sequence[float] | None = None,
        min_images_per_class: int = 1,
        max_classes: int | None = None,
        exclude: Iterable[str] = (),
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.root = Path(root)
        self.preprocess = Preprocess(size, crop)
        self.transform = transform
        found = list_identities(self.root)
        self.classes = select_identities({name: len(found[name]) for name in sorted(found)}, min_images_per_class,
                                         max_classes, exclude)
        if not self.classes:
            raise ValueError(f"no identity in {self.root} passes the filters (min_images_per_class={min_images_per_class})")
        self.class_to_label = {name: label for label, name in enumerate(self.classes)}
        self.samples = [(path, label) for label, name in enumerate(self.classes) for path in found[name]]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        """The label of every sample, in order (for samplers that group by identity)."""
        return [label for _, label in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.samples[index]
        x = self.preprocess(path)  # (3, H, W)
        if self.transform is not None:
            x = self.transform(x)
        return x, label
