"""CombinedMarginLoss (ArcFace, CosFace, SphereFace, easy margin) against s·(cos(m1·θ_y + m2) − m3) by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.heads.logits import ClassLogits
from training.losses import LOSSES
from training.losses.combined_margin import CombinedMarginLoss

SCALE = 64.0
# rows: cos θ to 3 classes; the target (LABELS) cosines are 0.8, 0.3, −0.2, −0.95 (θ ≈ 2.82: θ + 0.5 > π)
COS = np.array([[0.8, 0.1, -0.3], [0.2, 0.3, 0.6], [0.4, 0.0, -0.2], [-0.1, -0.95, 0.5]])
LABELS = np.array([0, 1, 2, 1])
COS_Y = COS[np.arange(4), LABELS]


def logits() -> ClassLogits:
    return ClassLogits(cos=torch.tensor(COS), labels=torch.tensor(LABELS), global_labels=torch.tensor(LABELS),
                       class_ids=torch.arange(3), embeddings=torch.ones(4, 2, dtype=torch.float64))


def expected(targets: list[float]) -> tuple[np.ndarray, float]:
    """(scaled logits with the target column replaced, mean softmax cross-entropy), in numpy."""
    z = SCALE * COS.copy()
    z[np.arange(4), LABELS] = SCALE * np.asarray(targets)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    return z, float(np.mean(lse - z[np.arange(4), LABELS]))


def arcface_target(c: float, m: float) -> float:
    theta = math.acos(c)
    return math.cos(theta + m) if theta + m <= math.pi else c - m * math.sin(m)  # insightface's linear fallback


CASES = {
    "arcface": (dict(m1=1.0, m2=0.5, m3=0.0), [arcface_target(c, 0.5) for c in COS_Y]),
    "cosface": (dict(m1=1.0, m2=0.0, m3=0.35), [c - 0.35 for c in COS_Y]),
    "sphereface": (dict(m1=2.0, m2=0.0, m3=0.0), [math.cos(2 * math.acos(c)) for c in COS_Y]),
    "combined": (dict(m1=1.0, m2=0.3, m3=0.2), [arcface_target(c, 0.3) - 0.2 for c in COS_Y]),
    "arcface_easy": (dict(m1=1.0, m2=0.5, m3=0.0, easy_margin=True),
                     [math.cos(math.acos(c) + 0.5) if c > 0 else c for c in COS_Y]),
}


@pytest.mark.parametrize("name", CASES)
def test_loss_and_logits_follow_the_formula(name):
    kwargs, targets = CASES[name]
    out = CombinedMarginLoss(SCALE, **kwargs)(logits())
    z, ce = expected(targets)
    np.testing.assert_allclose(out.logits.numpy(), z, rtol=0, atol=1e-5)
    assert out.loss.item() == pytest.approx(ce, rel=1e-6)


def test_known_values():
    """Worked by hand: cos(acos 0.8 + 0.5) = 0.8·cos 0.5 − 0.6·sin 0.5; the fallback at cos θ = −0.95."""
    out = CombinedMarginLoss(SCALE, 1.0, 0.5, 0.0)(logits())
    target = out.logits[np.arange(4), LABELS] / SCALE
    assert target[0].item() == pytest.approx(0.8 * 0.8775825619 - 0.6 * 0.4794255386, abs=1e-7)  # 0.41440
    assert target[3].item() == pytest.approx(-0.95 - 0.5 * 0.4794255386, abs=1e-7)  # −1.18971
    assert math.acos(-0.95) + 0.5 > math.pi  # the row that takes the fallback


def test_registered_forms():
    arc, cos = LOSSES.build("arcface"), LOSSES.build("cosface")
    assert (arc.scale, arc.m1, arc.m2, arc.m3, arc.easy_margin) == (64.0, 1.0, 0.5, 0.0, False)
    assert (cos.scale, cos.m1, cos.m2, cos.m3) == (64.0, 1.0, 0.0, 0.35)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_arcface_gradient_stays_finite_under_half_precision_autocast(dtype):
    """A sample that sits on its class center (cos θ_y = 1, as the head computes it in half precision under
    autocast) gets a finite gradient; clamping in the half type itself (1 − 1e-7 rounds to 1) gives −inf."""
    emb = torch.eye(4, 8, requires_grad=True)  # (B, D) unit rows; each is its class's weight: cos θ_y = 1 exactly
    weight = torch.eye(4, 8)  # (C, D)
    labels = torch.arange(4)
    with torch.autocast("cpu", dtype=dtype):
        cos = torch.nn.functional.linear(emb, weight)  # (B, C) in `dtype`
        assert cos.dtype == dtype and bool((cos.diagonal() == 1).all())
        out = LOSSES.build("arcface")(ClassLogits(cos=cos, labels=labels, global_labels=labels,
                                                  class_ids=torch.arange(4), embeddings=emb))
    out.loss.backward()
    assert torch.isfinite(out.loss) and bool(torch.isfinite(emb.grad).all())

    cos_y = torch.ones(4, dtype=dtype, requires_grad=True)
    torch.acos(cos_y.clamp(-1 + 1e-7, 1 - 1e-7).float()).sum().backward()  # the clamp in the half type
    assert not bool(torch.isfinite(cos_y.grad).all())
