from pathlib import Path

from PIL import Image

from training.data.split import split


def _tree(root: Path, spec: dict[str, list[str]]) -> Path:
    for ident, files in spec.items():
        (root / ident).mkdir(parents=True)
        for f in files:
            Image.new("RGB", (8, 8)).save(root / ident / f)
    return root


def test_split_is_identity_disjoint_and_merges_sources(tmp_path):
    a = _tree(tmp_path / "a", {"1": ["x.jpg", "y.jpg"], "2": ["z.jpg"], "3": ["p.jpg", "q.jpg"]})
    b = _tree(tmp_path / "b", {"1": ["y.jpg", "w.jpg"], "4": ["r.jpg", "s.jpg"], "5": ["t.jpg", "u.jpg"], "6": ["v.jpg", "k.jpg"]})
    n_train, n_hold = split([a, b], tmp_path / "train", tmp_path / "hold", holdout_every=2, keep_in_train=[a])
    train = {p.name for p in (tmp_path / "train").iterdir()}
    hold = {p.name for p in (tmp_path / "hold").iterdir()}
    assert not train & hold and train | hold == {"1", "2", "3", "4", "5", "6"}
    assert hold == {"4", "6"}  # candidates 4, 5, 6 (not in `a`, ≥ 2 images); every 2nd
    assert (n_train, n_hold) == (4, 2)
    assert sorted(p.name for p in (tmp_path / "train" / "1").iterdir()) == ["w.jpg", "x.jpg", "y.jpg"]  # y counted once
    assert all(p.is_symlink() for p in (tmp_path / "train" / "1").iterdir())
