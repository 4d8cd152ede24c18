from __future__ import annotations

import numpy as np
import pytest

from engines.align import align, umeyama
from engines.reference_landmarks import get_reference, reference_names

# REFERENCE.md's insightface template, typed in again rather than imported from the code under test
ARCFACE_REFERENCE = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366], [41.5493, 92.3655], [70.7299, 92.2041]]


def test_registry_lists_both_sets():
    assert {"arcface_112", "dlib_150"} <= set(reference_names())
    with pytest.raises(KeyError, match="dlib_150"):  # the error names what is known
        get_reference("no_such_set")


@pytest.mark.parametrize("name, size", [("arcface_112", 112), ("dlib_150", 150)])
def test_reference_shape_and_size(name, size):
    points, got_size = get_reference(name)
    assert got_size == size
    assert points.shape == (5, 2) and points.dtype == np.float32
    assert ((points > 0) & (points < size - 1)).all()


def test_arcface_values_are_the_reference():
    np.testing.assert_allclose(get_reference("arcface_112")[0], ARCFACE_REFERENCE, atol=1e-4)


def test_get_reference_returns_a_copy():
    points, _ = get_reference("dlib_150")
    points[:] = 0
    assert get_reference("dlib_150")[0].min() > 0


def test_dlib_150_maps_to_itself():
    points, size = get_reference("dlib_150")
    np.testing.assert_allclose(umeyama(points, points), [[1, 0, 0], [0, 1, 0]], atol=1e-9)
    # aligning a chip whose landmarks already sit on the reference points gives the chip back, pixel for pixel
    chip = np.random.default_rng(0).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    np.testing.assert_array_equal(align(chip, points, size, points, size), chip)


@pytest.mark.parametrize("name", ["arcface_112", "dlib_150"])
def test_reference_is_a_frontal_face(name):
    """Eyes above the nose above the mouth, left/right in image order, nearly mirror-symmetric about the crop centre."""
    (le, re, nose, lm, rm), size = get_reference(name)
    assert le[0] < re[0] and lm[0] < rm[0]
    assert max(le[1], re[1]) < nose[1] < min(lm[1], rm[1])
    centre = (size - 1) / 2
    for left, right in ((le, re), (lm, rm)):
        assert abs((left[0] + right[0]) / 2 - centre) < 1.5 and abs(left[1] - right[1]) < 0.5
    assert abs(nose[0] - centre) < 1.5
