from __future__ import annotations

import os
from pathlib import Path

import pytest


def _upstream_file(variable: str, what: str) -> Path:
    """The upstream reference file the environment variable names (.ci/run fetches each), or a skip saying so."""
    value = os.environ.get(variable)
    if not value or not Path(value).is_file():
        pytest.skip(f"{variable} does not point at {what}")
    return Path(value)


@pytest.fixture(scope="session")
def dlib_dat() -> Path:
    """dlib_face_recognition_resnet_model_v1.dat from the face_recognition_models 0.3.0 sdist (FACESET_DLIB_DAT)."""
    return _upstream_file("FACESET_DLIB_DAT", "dlib_face_recognition_resnet_model_v1.dat "
                          "(in the face_recognition_models==0.3.0 sdist; .ci/run fetches it)")


@pytest.fixture(scope="session")
def wheel() -> Path:
    """The facenet-pytorch 2.6.0 wheel whose MTCNN weights training.convert.mtcnn converts (FACESET_MTCNN_WHEEL)."""
    return _upstream_file("FACESET_MTCNN_WHEEL", "facenet_pytorch-2.6.0-py3-none-any.whl "
                          "(pip download facenet-pytorch==2.6.0 --no-deps -d /tmp/fnp)")
