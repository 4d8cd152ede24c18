"""The CAFace fusion network: per-frame assignment, additive memory, loss, sets, export parity, a training smoke run."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from engines.fusion import FusionModel
from engines.model_card import ModelCard
from training.caface.config import caface_configs, load_caface_config
from training.caface.export import export_fusion
from training.caface.loss import (
    caface_loss,
    centre_loss,
    class_centres,
    frame_quality_loss,
    frame_quality_targets,
    sequential_loss,
)
from training.caface.model import CAFace, FusionArch
from training.caface.sets import Features, SetSampler, build_templates
from training.caface.train import train

from .synthetic import synthetic_features

REPO = Path(__file__).resolve().parents[3]
TINY = FusionArch(embedding_size=16, style_size=12, clusters=4, style_dim=8, norm_dim=4, width=16, heads=2, depth=1,
                  stored_style=3, evidence_frames=2.0)


def tiny_model(seed: int = 0) -> CAFace:
    torch.manual_seed(seed)
    model = CAFace(TINY, 38.0, 50.0).eval()
    for p in model.aggregate.out.parameters():  # away from the zero init, so the weights are not just the shares
        torch.nn.init.normal_(p, std=0.5)
    return model


def frames(n: int, arch: FusionArch = TINY, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randn(n, arch.embedding_size, generator=g) * 11.0  # norms around 44
    return raw, torch.randn(n, arch.style_size, generator=g)


@torch.no_grad()
def test_a_frames_assignment_ignores_the_other_frames():
    model = tiny_model()
    raw, style = frames(10)
    a_all, f_all, s_all = model.assign(raw, style)
    for i in (0, 4, 9):
        a_one, f_one, s_one = model.assign(raw[i : i + 1], style[i : i + 1])
        torch.testing.assert_close(a_one[0], a_all[i], rtol=0, atol=1e-6)
        torch.testing.assert_close(s_one[0], s_all[i], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(f_one[0], f_all[i])
    other_raw, other_style = frames(7, seed=1)
    a_mixed = model.assign(torch.cat([raw[:3], other_raw]), torch.cat([style[:3], other_style]))[0]
    torch.testing.assert_close(a_mixed[:3], a_all[:3], rtol=0, atol=1e-6)
    torch.testing.assert_close(a_all.sum(1), torch.ones(10))
    assert torch.allclose(s_all[:, -1], raw.norm(dim=1)) and torch.allclose(f_all.norm(dim=1), torch.ones(10))
    assert s_all.shape == (10, TINY.stored_style + 2) and bool(((s_all[:, -2] > 0) & (s_all[:, -2] < 1)).all())


@torch.no_grad()
def test_memory_is_the_same_whatever_the_order_and_batching():
    model = tiny_model()
    raw, style = frames(24)
    one = torch.zeros(24, dtype=torch.long)
    reference = model.memory(*model.assign(raw, style), one, 1)
    fused_reference = model.aggregate(*reference)[0]
    rng = np.random.default_rng(0)
    for _ in range(3):
        order = torch.from_numpy(rng.permutation(24))
        parts = [model.memory(*model.assign(raw[c], style[c]), one[c], 1) for c in order.tensor_split(5)]
        memory = [sum(p[k] for p in parts) for k in range(3)]
        for got, want in zip(memory, reference):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
        assert float(torch.dot(model.aggregate(*memory)[0][0], fused_reference[0])) >= 0.99999


def test_learning_the_frame_quality_leaves_the_fusion_alone():
    model = tiny_model()
    raw, style = frames(12)
    stored = model.assign(raw, style)[2]
    frame_quality_loss(stored[:, -2], torch.full((12,), 0.7)).backward()
    touched = {name for name, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched and all(name.startswith("cluster.frame_quality.") for name in touched)


@torch.no_grad()
def test_fresh_aggregation_is_the_plain_mean():
    """The output layer starts at zero: w_m = p_m and, with every c_m ≥ 1, f = normalise(mean f̂)."""
    torch.manual_seed(0)
    model = CAFace(TINY, 38.0, 50.0).eval()
    raw, style = frames(64)
    sums, style_sums, counts = model.memory(*model.assign(raw, style), torch.zeros(64, dtype=torch.long), 1)
    assert bool((counts >= 1).all())
    fused, weights, quality = model.aggregate(sums, style_sums, counts)
    unit = raw / raw.norm(dim=1, keepdim=True)
    expected = unit.mean(0) / unit.mean(0).norm()
    torch.testing.assert_close(fused[0], expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(weights[0, :, 0], counts[0] / 64, rtol=1e-4, atol=1e-6)
    r = model.assign(raw, style)[2][:, -2]  # each frame's quality
    torch.testing.assert_close(quality[0], 1 - torch.exp(-r.sum() / TINY.evidence_frames))


def test_loss_terms_against_their_formula():
    fused = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    centres = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    expected_centre = (0.0 + (1 - 1 / math.sqrt(2))) / 2
    assert centre_loss(fused, centres).item() == pytest.approx(expected_centre, abs=1e-7)
    sequential = torch.tensor([[1.0, 1.0], [0.0, 1.0]])
    assert sequential_loss(sequential, fused).item() == pytest.approx((1 - 1 / math.sqrt(2)) / 2, abs=1e-7)
    total, terms = caface_loss(fused, sequential, centres)
    assert total.item() == pytest.approx(terms["centre"] + terms["sequential"], abs=1e-7)
    r, t = torch.tensor([0.5, 0.9, 0.0]), torch.tensor([1.0, 0.6, 0.0])
    expected_quality = (0.25 + 0.09 + 0.0) / 3
    assert frame_quality_loss(r, t).item() == pytest.approx(expected_quality, abs=1e-7)
    total, terms = caface_loss(fused, sequential, centres, r, t)
    assert total.item() == pytest.approx(expected_centre + terms["sequential"] + expected_quality, abs=1e-6)
    # targets: image 0's frames against image 1's clean direction, and the reverse
    emb = np.array([[[1.0, 0.0], [0.6, 0.8]], [[0.0, 2.0], [0.0, 1.0]]])  # (N=2, V=2, D=2), one identity
    targets = frame_quality_targets(emb, np.array([0, 0]), 1, low=0.5, high=1.0)
    np.testing.assert_allclose(targets, [[0.0, (0.8 - 0.5) / 0.5], [0.0, 0.0]], atol=1e-6)
    w = class_centres(np.array([[3.0, 0.0], [0.0, 1.0], [0.0, -5.0]]), np.array([0, 0, 1]), 2)
    np.testing.assert_allclose(w, [[1 / math.sqrt(2), 1 / math.sqrt(2)], [0.0, -1.0]], atol=1e-7)


def test_sets_and_templates(tmp_path):
    features = Features.load(synthetic_features(tmp_path / "f.npz", identities=6, images=5, dim=8, style=4))
    rows, variants, index, labels = SetSampler(features, seed=0).sample(32)
    sizes = np.bincount(index, minlength=32)
    assert sizes.min() >= 2 and sizes.max() <= 16
    assert (features.labels[rows] == labels[index]).all()  # every frame of a set is its identity's
    for b in range(32):
        pairs = set(zip(rows[index == b].tolist(), variants[index == b].tolist()))
        assert len(pairs) == sizes[b]  # no (image, variant) twice
    rows, variants, index, t_labels = build_templates(features, "one_good")
    assert len(t_labels) == 12
    for t in range(12):
        assert (variants[index == t] == 0).sum() == 1  # one clean frame per template
    a, b = set(rows[index == 0].tolist()), set(rows[index == 1].tolist())
    assert not a & b and t_labels[0] == t_labels[1]


@pytest.mark.parametrize("path", caface_configs(), ids=lambda p: p.stem)
def test_shipped_caface_configs_validate(path):
    cfg = load_caface_config(path)
    assert cfg.name == path.stem and cfg.sets.min_size <= cfg.sets.max_size
    CAFace(cfg.arch, 38.0, 50.0)


def test_export_parity_and_engine(tmp_path):
    model = tiny_model()
    recognition = ModelCard.load(REPO / "models" / "default", verify=False)
    ck = {"state_dict": model.state_dict(), "arch": TINY.model_dump(), "quality_range": [38.0, 50.0],
          "config": load_caface_config("celeba-caface").model_dump(), "training_identities": 3, "step": 0,
          "recognition": {"name": recognition.name, "version": recognition.version,
                          "sha256": recognition.files.onnx.sha256}}
    torch.save(ck, tmp_path / "caface.pt")
    exported = export_fusion(tmp_path / "caface.pt", tmp_path / "out", REPO / "models" / "default")
    assert exported.parity.aggregate_min_cosine >= 0.99999 and exported.parity.assign_max_abs_diff <= 1e-4
    fusion = FusionModel.load(tmp_path / "out")
    raw, style = frames(9)
    with torch.no_grad():
        want = model(raw, style, torch.zeros(9, dtype=torch.long), 1)
    got = fusion.fuse(raw.numpy(), style.numpy())
    assert float(np.dot(got.embedding, want[0][0].numpy())) >= 0.99999
    assert got.quality == pytest.approx(float(want[2][0]), abs=1e-5)
    parts = [fusion.memory_delta(fusion.assign(raw[k].numpy(), style[k].numpy())).to_vector() for k in (slice(4), slice(4, 9))]
    assert fusion.memory_from_vector(sum(parts)).counts.sum() == pytest.approx(9.0)


def test_training_smoke_and_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("FACESET_RUNS_DIR", str(tmp_path))
    path = synthetic_features(tmp_path / "f.npz", identities=16, images=5)
    overrides = [f"features.train={path}", f"features.holdout={path}", "features.eval_protected=null",
                 "features.eval_every=4", "batch_sets=8", "log_every=5", "checkpoint_every=10",
                 "arch.width=16", "arch.style_dim=8", "arch.heads=2", "arch.depth=1", "optim.warmup_steps=2"]
    out = train(load_caface_config("celeba-caface", overrides + ["steps=10"]))
    assert out.is_file() and (tmp_path / "celeba-caface" / "eval_identities.txt").read_text().count("\n") == 4
    out = train(load_caface_config("celeba-caface", overrides + ["steps=20"]))  # resumes at step 10
    ck = torch.load(out, weights_only=False)
    assert ck["step"] == 20
    lines = (tmp_path / "celeba-caface" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines if '"loss"' in x] == [5, 10, 15, 20]
