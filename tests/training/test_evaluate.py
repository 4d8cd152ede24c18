"""Torch-side pair evaluation plumbing on a tiny synthetic benchmark."""
from __future__ import annotations

import shutil

import numpy as np
import torch
from PIL import Image

from training.data.transforms import Preprocess
from training.evaluate import embed_pairs, load_backbone, magnitude_by_degradation, pair_summary


def _pairs_benchmark(root):
    """3 same pairs of *identical* images and 3 different pairs of unrelated images (flat LFW layout)."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    names = [f"P{i}" for i in range(6)]
    for n in names:
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(root / "images" / f"{n}_0001.jpg")
        shutil.copy(root / "images" / f"{n}_0001.jpg", root / "images" / f"{n}_0002.jpg")
    lines = ["1\t3"] + [f"{n}\t1\t2" for n in names[:3]] + [f"{names[i]}\t1\t{names[i + 3]}\t1" for i in range(3)]
    (root / "pairs.txt").write_text("\n".join(lines) + "\n")
    return root


def test_identical_pairs_verify_perfectly(tmp_path):
    root = _pairs_benchmark(tmp_path)
    model, size = load_backbone("untrained:mobilefacenet:64", torch.device("cpu"))
    pe = embed_pairs(model, root / "pairs.txt", root / "images", Preprocess(size), torch.device("cpu"))
    cos = (pe.a * pe.b).sum(1) / np.linalg.norm(pe.a, axis=1) / np.linalg.norm(pe.b, axis=1)
    assert np.allclose(cos[pe.issame], 1.0, atol=1e-5)
    assert np.all(cos[~pe.issame] < 0.9999)
    assert pair_summary(pe, n_folds=3)["accuracy"] == 1.0


def test_magnitude_by_degradation_reports_every_level(tmp_path):
    rng = np.random.default_rng(1)
    paths = []
    for i in range(3):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    model, size = load_backbone("untrained:mobilefacenet:64", torch.device("cpu"))
    out = magnitude_by_degradation(model, paths, Preprocess(size), torch.device("cpu"), {"blur": (0, 2)})
    (s0, m0), (s1, m1) = out["blur"]
    assert (s0, s1) == (0.0, 2.0) and m0 > 0 and m1 > 0 and m0 != m1


def test_bin_verification_set(tmp_path):
    """An insightface .bin (pickle of encoded images + issame) with identical same-pairs verifies perfectly."""
    import io
    import pickle

    from training.evaluate import embed_bin

    rng = np.random.default_rng(2)
    bins, issame = [], []
    for i in range(8):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf, format="PNG")
        a = buf.getvalue()
        if i % 2 == 0:
            bins += [a, a]
            issame.append(True)
        else:
            buf2 = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)).save(buf2, format="PNG")
            bins += [a, buf2.getvalue()]
            issame.append(False)
    path = tmp_path / "tiny.bin"
    path.write_bytes(pickle.dumps((bins, issame), protocol=2))
    model, _ = load_backbone("untrained:mobilefacenet:64", torch.device("cpu"))
    pe = embed_bin(model, path, torch.device("cpu"))
    assert pe.a.shape == (8, 64) and pe.issame.tolist() == issame
    assert pair_summary(pe, n_folds=2)["accuracy"] == 1.0
