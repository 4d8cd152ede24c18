"""Face detectors: photo in, faces with a box, a score and 5 landmarks out.

Every detector keeps one contract, `FaceDetector.detect(image_rgb) -> list[Detection]`, with the
faces sorted largest first, and registers by name in DETECTORS (configs name the detector).

Coordinates are in pixels of the input image with pixel i's centre at i (OpenCV's convention,
the one cv2.warpAffine uses, so landmarks go straight into `engines.align`). A box may reach
outside the image when the face is cut by the border.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engines.registry import Registry

DETECTORS: Registry = Registry("detector")

LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "left_mouth", "right_mouth")


@dataclass(frozen=True)
class Detection:
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2
    score: float  # face probability of the last stage
    landmarks: np.ndarray  # (5, 2) float (x, y), order LANDMARK_NAMES; left/right as seen in the image

    @property
    def area(self) -> float:
        x1, y1, x2, y2 = self.bbox
        return max(0.0, x2 - x1) * max(0.0, y2 - y1)


class FaceDetector(Protocol):
    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        """All faces in an (H, W, 3) uint8 RGB image, largest first."""
        ...


def build_detector(name: str, **kwargs) -> FaceDetector:
    _import_all()
    return DETECTORS.build(name, **kwargs)


def _import_all() -> None:
    # detectors register on import; imported lazily so `import engines.detection` loads no model code
    from engines.detection import mtcnn  # noqa: F401
