"""Training data: folder-per-identity and insightface RecordIO datasets, augmentation, and the
insightface ``.bin`` verification sets.

Datasets register by name so configs can say ``dataset: folder`` or ``dataset: recordio``; every
one is a plain map-style dataset yielding (float32 (3, H, W) in [−1, 1], int label), exposes
``num_classes`` and ``targets``, and holds no open file at construction (DistributedSampler and
DataLoader workers pickle it).
"""
from engines.registry import Registry

DATASETS: Registry = Registry("dataset")

from training.data.folder import FolderFaceDataset  # noqa: E402
from training.data.recordio import RecordFaceDataset, folder_to_recordio  # noqa: E402
from training.data.transforms import AugmentConfig, Preprocess, build_transforms  # noqa: E402
from training.data.verification import VerificationSet, load_verification_bin  # noqa: E402


def build_dataset(name: str, **kwargs):
    """The registered dataset `name` built with kwargs, e.g. build_dataset("folder", root=...)."""
    return DATASETS.build(name, **kwargs)


__all__ = [
    "DATASETS",
    "AugmentConfig",
    "FolderFaceDataset",
    "Preprocess",
    "RecordFaceDataset",
    "VerificationSet",
    "build_dataset",
    "build_transforms",
    "folder_to_recordio",
    "load_verification_bin",
]
