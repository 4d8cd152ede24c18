from __future__ import annotations


import cv2
import numpy as np
import pytest

from engines.align import ARCFACE_TEMPLATE, align, alignment_matrix, scaled_template, transform_points, umeyama


def similarity(angle: float, scale: float, shift) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


@pytest.mark.parametrize("seed", range(5))
def test_umeyama_recovers_a_known_similarity(seed):
    rng = np.random.default_rng(seed)
    src = rng.uniform(-50, 150, size=(7, 2))
    truth = similarity(rng.uniform(-np.pi, np.pi), rng.uniform(0.2, 5.0), rng.uniform(-100, 100, size=2))
    dst = src @ truth[:, :2].T + truth[:, 2]
    np.testing.assert_allclose(umeyama(src, dst), truth, atol=1e-9)


def test_template_maps_to_itself():
    np.testing.assert_allclose(umeyama(ARCFACE_TEMPLATE, ARCFACE_TEMPLATE), [[1, 0, 0], [0, 1, 0]], atol=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_umeyama_is_the_least_squares_similarity(seed):
    """Against an independent solver: a scaled rotation is [[a, −b], [b, a]], linear in (a, b, tx, ty)."""
    rng = np.random.default_rng(seed)
    src = rng.uniform(0, 100, size=(5, 2))
    dst = rng.uniform(0, 100, size=(5, 2))  # unrelated points: a large residual to minimise
    rows_x = np.stack([src[:, 0], -src[:, 1], np.ones(5), np.zeros(5)], axis=1)
    rows_y = np.stack([src[:, 1], src[:, 0], np.zeros(5), np.ones(5)], axis=1)
    (a, b, tx, ty), *_ = np.linalg.lstsq(np.concatenate([rows_x, rows_y]), np.concatenate([dst[:, 0], dst[:, 1]]), rcond=None)
    np.testing.assert_allclose(umeyama(src, dst), [[a, -b, tx], [b, a, ty]], atol=1e-9)


def test_mirror_image_gives_a_rotation_not_a_reflection():
    mirrored = ARCFACE_TEMPLATE * np.array([-1.0, 1.0])
    matrix = umeyama(ARCFACE_TEMPLATE, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_degenerate_points_rejected():
    with pytest.raises(ValueError):
        umeyama(np.ones((5, 2)), ARCFACE_TEMPLATE)


def test_template_scales_with_output_size():
    np.testing.assert_allclose(scaled_template(224), ARCFACE_TEMPLATE * 2)
    truth = similarity(0.3, 1.7, (40.0, -10.0))
    landmarks = transform_points(truth, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(transform_points(alignment_matrix(landmarks, 224), landmarks), ARCFACE_TEMPLATE * 2, atol=1e-9)


def blob_centres(image: np.ndarray, count: int) -> np.ndarray:
    """Intensity-weighted centres of the `count` bright blobs of a single-channel image, sorted by x then y."""
    _, labels = cv2.connectedComponents((image > 20).astype(np.uint8))
    ys, xs = np.mgrid[: image.shape[0], : image.shape[1]]
    weights = image.astype(np.float64)
    centres = [
        [(xs * weights)[labels == k].sum() / weights[labels == k].sum(), (ys * weights)[labels == k].sum() / weights[labels == k].sum()]
        for k in range(1, labels.max() + 1)
    ]
    assert len(centres) == count
    return np.array(centres)


def test_align_puts_the_landmarks_on_the_template():
    """Draw blobs at known landmarks of a rotated, scaled face; after alignment they sit on the template."""
    truth = similarity(0.35, 2.4, (150.0, 60.0))
    landmarks = transform_points(truth, ARCFACE_TEMPLATE)
    h, w = 420, 460
    ys, xs = np.mgrid[:h, :w]
    image = np.zeros((h, w), dtype=np.float64)
    for x, y in landmarks:
        image += 250 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * 4.0**2))
    aligned = align(np.clip(image, 0, 255).astype(np.uint8), landmarks)
    assert aligned.shape == (112, 112)
    found = blob_centres(aligned, 5)
    expected = ARCFACE_TEMPLATE
    order = lambda p: np.lexsort((p[:, 1], p[:, 0]))  # noqa: E731
    np.testing.assert_allclose(found[order(found)], expected[order(expected)], atol=0.3)


def test_outside_the_photo_is_zero():
    image = np.full((100, 100, 3), 200, dtype=np.uint8)
    # the face's landmarks near the top-left corner: most of the crop lies outside the photo
    landmarks = transform_points(similarity(0.0, 0.5, (-20.0, -20.0)), ARCFACE_TEMPLATE)
    aligned = align(image, landmarks)
    assert aligned.shape == (112, 112, 3)
    assert (aligned[:20, :20] == 0).all()  # maps to negative photo coordinates
    assert (aligned[-5:, -5:] == 200).all()


@pytest.mark.data
def test_aligned_lfw_faces_land_on_the_template(data_dir):
    from engines.detection.mtcnn import Detector

    detector = Detector()
    paths = sorted((data_dir / "lfw-dev" / "images").glob("*.jpg"))[::8]
    residual, redetected = [], []
    for path in paths:
        image = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        landmarks = detector.detect(image)[0].landmarks
        matrix = alignment_matrix(landmarks)
        # how far a real face's landmarks stay from the template after the best similarity
        residual.append(np.linalg.norm(transform_points(matrix, landmarks) - scaled_template(112), axis=1).mean())
        # detecting again on the aligned crop must find the landmarks where the matrix sent them
        again = detector.detect(align(image, landmarks))[0].landmarks
        redetected.append(np.linalg.norm(again - transform_points(matrix, landmarks), axis=1).mean())
    residual, redetected = np.array(residual), np.array(redetected)
    print(f"template residual median {np.median(residual):.2f} px, re-detection error median {np.median(redetected):.2f} px")
    assert np.median(residual) < 4.0 and residual.max() < 10.0
    assert np.median(redetected) < 2.0 and redetected.max() < 4.0
