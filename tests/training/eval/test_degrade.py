import numpy as np
import pytest

from training.eval.degrade import DEGRADATIONS, degrade


@pytest.fixture
def face():
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)


def _high_freq(img):
    g = img.astype(np.float64).mean(2)
    return np.abs(np.diff(g, axis=0)).mean() + np.abs(np.diff(g, axis=1)).mean()


@pytest.mark.parametrize("kind,levels", [("blur", (0.5, 1, 2, 4)), ("lowres", (1.5, 2, 4, 8))])
def test_detail_falls_with_strength(face, kind, levels):
    energy = [_high_freq(degrade(face, kind, s)) for s in levels]
    assert all(a > b for a, b in zip(energy, energy[1:]))
    assert energy[0] < _high_freq(face)


def test_occlusion_covers_the_requested_area(face):
    out = degrade(face, "occlude", 0.25, seed=3)
    changed = np.any(out != face, axis=2).mean()
    assert 0.15 < changed <= 0.26
    assert np.all(out[np.any(out != face, axis=2)] == 128)


def test_noise_is_deterministic_and_scaled(face):
    flat = np.full((64, 64, 3), 128, np.uint8)
    a, b = degrade(flat, "noise", 20, seed=1), degrade(flat, "noise", 20, seed=1)
    assert np.array_equal(a, b)
    assert 17 < a.astype(np.float64).std() < 23


def test_registry_names():
    assert set(DEGRADATIONS.names()) == {"blur", "lowres", "occlude", "noise"}
