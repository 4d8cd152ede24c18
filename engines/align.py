"""Face alignment: a similarity transform from 5 landmarks to a template, then one affine warp.

Landmark order: left eye, right eye, nose, left mouth corner, right mouth corner, left/right as
seen in the image (what engines.detection returns). Points are (x, y) pixels with pixel i's
centre at i, OpenCV's convention, so the matrix goes to cv2.warpAffine unchanged.

Outside the photo the crop is filled with zeros (cv2.BORDER_CONSTANT): that is what insightface's
crops (cv2.warpAffine's default) look like, so arcface-family models see what they were trained
on; replicating the border would smear edge pixels into streaks across the face's surroundings.
"""
from __future__ import annotations

import cv2
import numpy as np

# The arcface 5-point template for a 112×112 crop (REFERENCE.md).
ARCFACE_TEMPLATE = np.array(
    [
        [38.2946, 51.6963],
        [73.5318, 51.5014],
        [56.0252, 71.7366],
        [41.5493, 92.3655],
        [70.7299, 92.2041],
    ]
)
ARCFACE_TEMPLATE_SIZE = 112


def umeyama(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity dst ≈ c·R·src + t, as a (2, 3) matrix [c·R | t].

    Umeyama, "Least-squares estimation of transformation parameters between two point patterns",
    IEEE TPAMI 13(4), 1991. With μ_s, μ_d the means and σ_s² = (1/N)·Σ‖s_i − μ_s‖²:
      Σ = (1/N)·Σ (d_i − μ_d)(s_i − μ_s)ᵀ = U·D·Vᵀ (SVD)
      S = diag(1, sign(det U · det V))   (a rotation, never a reflection)
      R = U·S·Vᵀ,  c = tr(D·S) / σ_s²,  t = μ_d − c·R·μ_s
    """
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two (N, 2) point sets with N ≥ 2, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    src_c, dst_c = src - mu_s, dst - mu_d  # (N, 2)
    var_s = (src_c**2).sum(axis=1).mean()
    if var_s <= 1e-12:
        raise ValueError("source points all coincide: no similarity is defined")
    cov = dst_c.T @ src_c / len(src)  # (2, 2)
    u, d, vt = np.linalg.svd(cov)
    s = np.array([1.0, np.sign(np.linalg.det(u) * np.linalg.det(vt)) or 1.0])
    rotation = u @ np.diag(s) @ vt
    scale = (d * s).sum() / var_s
    translation = mu_d - scale * rotation @ mu_s
    return np.concatenate([scale * rotation, translation[:, None]], axis=1)  # (2, 3)


def transform_points(matrix: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a (2, 3) affine matrix to (N, 2) points."""
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def scaled_template(size: int, template: np.ndarray | None = None, template_size: int = ARCFACE_TEMPLATE_SIZE) -> np.ndarray:
    """The template's points for a size×size crop: templates are given for a template_size crop and scale with it."""
    base = ARCFACE_TEMPLATE if template is None else np.asarray(template, dtype=np.float64)
    return base * (size / template_size)


def alignment_matrix(landmarks: np.ndarray, size: int = 112, template: np.ndarray | None = None,
                     template_size: int = ARCFACE_TEMPLATE_SIZE) -> np.ndarray:
    """The (2, 3) similarity taking the photo's landmarks onto the template of a size×size crop."""
    return umeyama(landmarks, scaled_template(size, template, template_size))


def align(image: np.ndarray, landmarks: np.ndarray, size: int = 112, template: np.ndarray | None = None,
          template_size: int = ARCFACE_TEMPLATE_SIZE) -> np.ndarray:
    """The size×size face crop whose landmarks best match the template (bilinear, zeros outside the photo).

    image: (H, W, C) or (H, W) uint8; landmarks: (5, 2) (x, y) in image pixels; template: (5, 2)
    points for a template_size crop (default: the arcface template for 112).
    """
    matrix = alignment_matrix(landmarks, size, template, template_size)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=0)
