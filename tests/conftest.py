from __future__ import annotations

from pathlib import Path

import pytest

from training.settings import get_settings


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real face data (FACESET_DATA_DIR); tests that need it skip with the reason where it is absent."""
    path = get_settings().data_dir
    if not (path / "lfw-dev" / "pairs.txt").exists():
        pytest.skip(f"real face data not found at {path} (set FACESET_DATA_DIR to the shared data folder)")
    return path
