"""Named reference landmarks: where a model expects the 5 face landmarks in its aligned input crop.

A set of reference landmarks (the "alignment template" of the face-alignment literature, and the
card's `input.template` field) is the (5, 2) (x, y) positions, in pixels of a size×size crop
(pixel i's centre at i, OpenCV's convention), of the 5 landmarks in
`engines.detection.LANDMARK_NAMES` order: left eye, right eye, nose, left mouth corner, right mouth
corner, left/right as seen in the image. A model card names its set; `engines.align.align(image,
landmarks, size, points, size)` makes the crop. Not to be confused with CAFace templates
(`service.templates`, a person's fused frames) or IJB evaluation templates.

Reference landmarks are for a detector's landmark *definition*, not only for a model: "eye" means
the eye centre as MTCNN marks it. A set measured with another landmark detector (dlib's 5-point
model marks eye corners) would misplace every crop by a few pixels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engines.align import ARCFACE_TEMPLATE, ARCFACE_TEMPLATE_SIZE
from engines.registry import Registry


@dataclass(frozen=True)
class ReferenceLandmarks:
    points: np.ndarray  # (5, 2) float32, pixels of a size×size crop
    size: int


REFERENCES: Registry = Registry("reference landmarks")


@REFERENCES.register("arcface_112")
def arcface_112() -> ReferenceLandmarks:
    """insightface's 112×112 template (REFERENCE.md), what arcface-family models were trained on."""
    return ReferenceLandmarks(ARCFACE_TEMPLATE.astype(np.float32), ARCFACE_TEMPLATE_SIZE)


# MTCNN's landmarks on dlib's own 150×150 chips (dlib.get_face_chip(img, shape5, size=150,
# padding=0.25), the chips dlib's face recognition ResNet was trained on). Measured on the 807 LFW
# dev-fold photos (shared/data/lfw-dev): dlib's pipeline (HOG detector, 5-point shape predictor,
# get_face_chip) made the chips; our MTCNN (models/detector, default thresholds, min face 20) ran
# on each chip and the face nearest the chip's centre was kept. Of the 800 chips where dlib's HOG
# detector had found the face (7 used a fallback box and are left out), MTCNN found a face in 797;
# each point below is the mean over those 797. Spread (std over chips, x and y, pixels): left eye
# (1.66, 1.88), right eye (1.57, 1.78), nose (5.53, 4.01), left mouth (4.27, 5.55), right mouth
# (4.57, 5.41); medians lie within 0.5 px of the means. Eyes, placed by dlib's own alignment, vary
# little; nose and mouth vary with pose and expression. After each chip's best similarity to these
# points the mean point residual is 3.3 px (median over chips; 90th percentile 5.4). Interocular
# distance 54.7 px. For comparison, dlib's 68-point eye centres (means of points 36-41 and 42-47)
# on the same chips average (47.19, 46.17) and (100.00, 46.19): MTCNN puts the eyes ~1 px higher
# and ~1 px further apart. Reproduce with training.data.align_tool.measure_landmarks over the chips.
DLIB_150_POINTS = (
    (47.0192, 45.0818),
    (101.7190, 45.1270),
    (73.9454, 77.7870),
    (50.5653, 104.4753),
    (97.5978, 104.5383),
)


@REFERENCES.register("dlib_150")
def dlib_150() -> ReferenceLandmarks:
    """dlib's 150×150 chip (size 150, padding 0.25) for MTCNN's landmarks; see the measurement above."""
    return ReferenceLandmarks(np.array(DLIB_150_POINTS, dtype=np.float32), 150)


def get_reference(name: str) -> tuple[np.ndarray, int]:
    """The named set's points ((5, 2) float32, a fresh copy the caller may change) and crop size."""
    reference = REFERENCES.build(name)
    return reference.points.copy(), reference.size


def reference_names() -> list[str]:
    return REFERENCES.names()
