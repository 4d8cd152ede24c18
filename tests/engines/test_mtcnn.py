from __future__ import annotations

import math
import shutil
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from engines.detection import DETECTORS, Detection, build_detector
from engines.detection.mtcnn import (
    DEFAULT_MODEL_DIR,
    Detector,
    crop_windows,
    nms,
    pnet_candidates,
    pyramid_scales,
    regress,
    square,
)


@pytest.fixture(scope="module")
def detector() -> Detector:
    return Detector(intra_op_threads=1)


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


# --- NMS against a plain python reference ---------------------------------------------------

def brute_force_nms(boxes, scores, threshold, mode):
    """Greedy NMS with python loops and per-pair overlaps, written from the definition."""
    def area(b):
        return max(0.0, b[2] - b[0]) * max(0.0, b[3] - b[1])

    def overlap(a, b):
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        denom = area(a) + area(b) - inter if mode == "union" else min(area(a), area(b))
        return inter / denom if denom > 0 else 0.0

    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    kept, removed = [], set()
    for i in order:
        if i in removed:
            continue
        kept.append(i)
        for j in order:
            if j not in removed and j != i and j not in kept and overlap(boxes[i], boxes[j]) > threshold:
                removed.add(j)
    return kept


def random_boxes(rng, n):
    """Jittered copies of a few boxes (as a detector proposes them), so every overlap level occurs."""
    centres = rng.uniform(0, 100, size=(8, 4))
    centres[:, 2:] = centres[:, :2] + rng.uniform(10, 40, size=(8, 2))
    boxes = centres[rng.integers(0, 8, size=n)] + rng.normal(0, 4, size=(n, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    return boxes, rng.uniform(0, 1, size=n)


@pytest.mark.parametrize("mode", ["union", "min"])
@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.7])
@pytest.mark.parametrize("seed", range(4))
def test_nms_matches_brute_force(mode, threshold, seed):
    rng = np.random.default_rng(seed)
    boxes, scores = random_boxes(rng, 150)
    got = nms(boxes, scores, threshold, mode)
    expected = brute_force_nms(boxes.tolist(), scores.tolist(), threshold, mode)
    assert got.tolist() == expected
    assert 0 < len(got) < len(boxes)  # the case exercises suppression, not a trivial pass-through


def test_nms_min_mode_drops_nested_box_that_iou_keeps():
    boxes = np.array([[0, 0, 100, 100], [10, 10, 40, 40]], dtype=float)  # IoU 0.09, min-overlap 1
    scores = np.array([0.9, 0.8])
    assert nms(boxes, scores, 0.7, "union").tolist() == [0, 1]
    assert nms(boxes, scores, 0.7, "min").tolist() == [0]


def test_nms_empty_and_bad_mode():
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []
    with pytest.raises(ValueError):
        nms(np.zeros((1, 4)), np.zeros(1), 0.5, "max")


# --- cascade pieces ---------------------------------------------------------------------------

def test_pyramid_scales_count_and_values():
    scales = pyramid_scales(150, 200, 20, 0.709)
    # levels k with 150·0.6·0.709^k ≥ 12
    count = math.floor(math.log(12 / 90) / math.log(0.709)) + 1
    assert len(scales) == count == 6
    np.testing.assert_allclose(scales, 0.6 * 0.709 ** np.arange(count))
    assert pyramid_scales(10, 10, 20, 0.709) == []  # smaller than the smallest face searched
    with pytest.raises(ValueError):
        pyramid_scales(100, 100, 20, 1.0)


def test_pnet_candidates_maps_cell_to_window():
    prob = np.zeros((6, 8), dtype=np.float32)
    prob[3, 5] = 0.9
    offsets = np.arange(4 * 6 * 8, dtype=np.float32).reshape(4, 6, 8)
    boxes, scores, deltas = pnet_candidates(prob, offsets, (0.5, 0.25), 0.6)
    # cell (row 3, col 5) reads the 12×12 window at (10, 6) of the scaled image
    np.testing.assert_allclose(boxes, [[10 / 0.5, 6 / 0.25, 22 / 0.5, 18 / 0.25]])
    np.testing.assert_allclose(scores, [0.9])
    np.testing.assert_allclose(deltas, [offsets[:, 3, 5]])


def test_regress_and_square():
    boxes = np.array([[10.0, 20.0, 50.0, 40.0]])  # w 40, h 20
    np.testing.assert_allclose(regress(boxes, np.array([[0.1, -0.5, 0.25, 1.0]])), [[14, 10, 60, 60]])
    np.testing.assert_allclose(square(boxes), [[10, 10, 50, 50]])  # side 40 around centre (30, 30)


def test_crop_windows_pads_outside_with_zeros():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, size=(50, 60, 3), dtype=np.uint8)  # no zero pixels inside
    boxes = np.array([[10.0, 5.0, 34.0, 29.0], [-12.0, -12.0, 12.0, 12.0]])
    crops, origin, extent = crop_windows(image, boxes, 24)
    np.testing.assert_array_equal(crops[0], image[5:29, 10:34])  # inside, same size: a plain copy
    assert (crops[1][:12, :] == 0).all() and (crops[1][:, :12] == 0).all()
    np.testing.assert_array_equal(crops[1][12:, 12:], image[:12, :12])
    np.testing.assert_array_equal(origin, [[10, 5], [-12, -12]])
    np.testing.assert_array_equal(extent, [[24, 24], [24, 24]])


# --- the detector on the shipped models ------------------------------------------------------

def test_registered_and_built_by_name():
    assert isinstance(build_detector("mtcnn"), Detector)
    assert "mtcnn" in DETECTORS


def test_card_checksum_is_enforced(tmp_path):
    copy = tmp_path / "detector"
    shutil.copytree(DEFAULT_MODEL_DIR, copy)
    data = bytearray((copy / "rnet.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "rnet.onnx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        Detector(copy)


def test_no_face_in_flat_or_tiny_images(detector):
    assert detector.detect(np.full((120, 160, 3), 128, dtype=np.uint8)) == []
    assert detector.detect(np.zeros((8, 8, 3), dtype=np.uint8)) == []


def test_rejects_bad_input(detector):
    with pytest.raises(ValueError):
        detector.detect(np.zeros((32, 32, 3), dtype=np.float32))
    with pytest.raises(ValueError):
        detector.detect(np.zeros((32, 32, 4), dtype=np.uint8))
    with pytest.raises(ValueError):
        Detector(thresholds=(0.6, 0.7))


def lfw_images(data_dir: Path, stride: int = 1) -> list[Path]:
    return sorted((data_dir / "lfw-dev" / "images").glob("*.jpg"))[::stride]


def plausible(face: Detection) -> bool:
    """Left eye left of the right eye; in the frame of the eye line (heads may roll), the nose below
    the eyes, both mouth corners below the nose, the left corner before the right one."""
    left_eye, right_eye, nose, left_mouth, right_mouth = face.landmarks
    axis = right_eye - left_eye
    down = np.array([-axis[1], axis[0]])  # the eye line turned 90° towards the chin (y points down)
    depth = lambda p: (p - (left_eye + right_eye) / 2) @ down  # noqa: E731
    return bool(
        left_eye[0] < right_eye[0]
        and (right_mouth - left_mouth) @ axis > 0
        and 0 < depth(nose) < min(depth(left_mouth), depth(right_mouth))
    )


@pytest.mark.data
def test_same_result_alone_and_in_batches(detector, data_dir):
    """RNet/ONet batch size must not change what is found."""
    one = Detector(max_batch=1)
    for path in lfw_images(data_dir, stride=100):
        image = read_rgb(path)
        a, b = detector.detect(image), one.detect(image)
        assert len(a) == len(b) > 0
        for fa, fb in zip(a, b):
            np.testing.assert_allclose(fa.bbox, fb.bbox, atol=1e-3)
            np.testing.assert_allclose(fa.landmarks, fb.landmarks, atol=1e-3)


def detection_rate(detector: Detector, paths: list[Path]) -> tuple[float, float, float]:
    """(share of images with a face, share of those whose largest face is plausible, seconds per image)."""
    found = ok = 0
    start = time.perf_counter()
    for path in paths:
        faces = detector.detect(read_rgb(path))
        found += bool(faces)
        ok += bool(faces) and plausible(faces[0])
    seconds = (time.perf_counter() - start) / len(paths)
    return found / len(paths), ok / max(found, 1), seconds


@pytest.mark.data
def test_finds_faces_in_lfw(detector, data_dir):
    paths = lfw_images(data_dir)
    assert len(paths) == 807
    rate, plausible_share, seconds = detection_rate(detector, paths)
    print(f"LFW: face found in {rate:.2%}, plausible landmarks {plausible_share:.2%}, {seconds * 1000:.1f} ms/image")
    assert rate >= 0.99
    assert plausible_share >= 0.99


@pytest.mark.data
def test_finds_faces_in_celeba_sample(detector, data_dir):
    paths = sorted((data_dir / "celeba-299").glob("*/*.jpg"))[::6]  # deterministic stride sample, 1050 of 6300
    assert len(paths) == 1050
    rate, plausible_share, seconds = detection_rate(detector, paths)
    print(f"CelebA sample of {len(paths)}: face found in {rate:.2%}, plausible {plausible_share:.2%}, {seconds * 1000:.1f} ms/image")
    assert rate >= 0.99
    assert plausible_share >= 0.99
