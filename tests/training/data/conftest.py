from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.training.data.images import encode, image_array


@pytest.fixture
def png_tree(tmp_path: Path) -> tuple[Path, dict[str, list[np.ndarray]]]:
    """root/<identity>/<n>.png with known pixels: identities 'b' (3), 'a' (2), 'c' (1), plus noise."""
    root = tmp_path / "faces"
    content: dict[str, list[np.ndarray]] = {}
    for i, (name, count) in enumerate([("b", 3), ("a", 2), ("c", 1)]):
        (root / name).mkdir(parents=True)
        content[name] = []
        for n in range(count):
            arr = image_array(10 * i + n)
            (root / name / f"{n}.png").write_bytes(encode(arr))
            content[name].append(arr)
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "empty").mkdir()
    return root, content
