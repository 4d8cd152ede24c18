"""Torch-side pair evaluation plumbing on a tiny synthetic benchmark."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from training.data.transforms import Preprocess
from training.eval.degrade import degrade
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


class ChannelSpread(torch.nn.Module):
    """An 'embedding' whose magnitude is easy to compute by hand and moves with blur and noise:
    the standard deviation of each input channel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).std(dim=2)  # (B, 3, H, W) -> (B, 3, H·W) -> (B, 3)


def test_magnitude_by_degradation_reports_every_level(tmp_path):
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (112, 112, 3), dtype=np.uint8) for _ in range(3)]
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for img, p in zip(images, paths):
        Image.fromarray(img).save(p)
    levels = {"blur": (0, 2), "noise": (0, 25, 50)}
    out = magnitude_by_degradation(ChannelSpread(), paths, Preprocess(112), torch.device("cpu"), levels)
    assert out.keys() == levels.keys()
    for kind, strengths in levels.items():
        assert [s for s, _ in out[kind]] == list(strengths)
        for s, got in out[kind]:
            frames = [degrade(img, kind, s, seed=i) if s else img for i, img in enumerate(images)]
            pixels = [(f.astype(np.float64) - 127.5) / 127.5 for f in frames]  # the backbone's input scaling
            expected = np.mean([np.linalg.norm(p.reshape(-1, 3).std(axis=0, ddof=1)) for p in pixels])
            assert got == pytest.approx(expected, rel=1e-5), (kind, s)
    assert out["blur"][1][1] < 0.9 * out["blur"][0][1]  # the levels are far apart: a mix-up would show


def test_an_untrained_backbone_is_seeded_without_touching_the_callers_rng():
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a, _ = load_backbone("untrained:mobilefacenet:64", torch.device("cpu"))
    assert torch.equal(torch.get_rng_state(), before)
    b, _ = load_backbone("untrained:mobilefacenet:64", torch.device("cpu"))
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


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
