"""insightface ``.bin`` verification sets (lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

A .bin is a Python pickle of (bins, issame): `bins` holds 2·P encoded images (JPEG/PNG bytes),
pair p being images 2p and 2p+1, and `issame` P booleans. They were written by Python 2, so they
are read with encoding="bytes". Unpickling can run arbitrary code, so only the few globals such a
file legitimately references (bytes re-encoding, and numpy arrays for bins stored as uint8
arrays) are allowed.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from training.data.transforms import crop_resize, load_rgb

_ALLOWED = {
    ("_codecs", "encode"),  # how Python 3 pickles bytes at protocol <= 2 (re-exported .bin files)
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
}


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"a verification .bin may not reference {module}.{name}")
        return super().find_class(module, name)


@dataclass
class VerificationSet:
    name: str
    images: np.ndarray  # (2P, H, W, 3) uint8 RGB; pair p is images[2p], images[2p + 1]
    issame: np.ndarray  # (P,) bool

    def __len__(self) -> int:
        return len(self.issame)


def _as_bytes(item) -> bytes:
    # bins are bytes in most files, uint8 arrays in some re-exports
    return item.tobytes() if isinstance(item, np.ndarray) else bytes(item)


def load_verification_bin(path: str | Path, size: int | None = 112) -> VerificationSet:
    """Decode every image of a .bin to RGB uint8; resize to size×size where it differs (None keeps)."""
    path = Path(path)
    with open(path, "rb") as f:
        bins, issame = _RestrictedUnpickler(f, encoding="bytes").load()
    issame = np.asarray(issame, dtype=bool)
    if len(bins) != 2 * len(issame):
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs (expected twice as many)")
    images = [np.asarray(crop_resize(load_rgb(_as_bytes(b)), size, None)) for b in bins]
    if len({im.shape for im in images}) > 1:
        raise ValueError(f"{path}: images differ in size; pass size= to resize them")
    return VerificationSet(path.stem, np.stack(images), issame)
