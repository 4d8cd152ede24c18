from __future__ import annotations

import os
import pickle
import struct

import numpy as np
import pytest

from training.data import load_verification_bin
from tests.training.data.images import encode, image_array


def python2_pickle(bins: list[bytes], issame: list[bool]) -> bytes:
    """What insightface's Python 2 tooling wrote: byte strings as (SHORT_)BINSTRING, protocol 2.

    Python 3 only reads these as bytes with encoding="bytes"; the default would decode them as text.
    """
    out = b"\x80\x02]("  # PROTO 2, EMPTY_LIST, MARK
    for b in bins:
        out += b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<I", len(b)) + b
    out += b"e]("  # APPENDS, EMPTY_LIST, MARK
    out += b"".join(b"\x88" if s else b"\x89" for s in issame)  # NEWTRUE / NEWFALSE
    return out + b"e\x86."  # APPENDS, TUPLE2, STOP


@pytest.fixture
def pairs():
    images = [image_array(i, h=8, w=8) for i in range(4)]
    return images, [encode(im) for im in images], [True, False]


def test_reads_python2_bin(tmp_path, pairs):
    images, bins, issame = pairs
    path = tmp_path / "lfw.bin"
    path.write_bytes(python2_pickle(bins, issame))
    with pytest.raises(UnicodeDecodeError):  # what a plain pickle.load would do
        pickle.loads(path.read_bytes())
    vs = load_verification_bin(path, size=None)
    assert vs.name == "lfw" and len(vs) == 2 and vs.issame.tolist() == issame
    assert vs.images.shape == (4, 8, 8, 3) and vs.images.dtype == np.uint8
    np.testing.assert_array_equal(vs.images, np.stack(images))


def test_reads_python3_exports(tmp_path, pairs):
    images, bins, issame = pairs
    for protocol, items in [(2, bins), (4, [np.frombuffer(b, np.uint8) for b in bins])]:
        path = tmp_path / f"p{protocol}.bin"
        path.write_bytes(pickle.dumps((items, issame), protocol=protocol))
        np.testing.assert_array_equal(load_verification_bin(path, size=None).images, np.stack(images))


def test_resizes(tmp_path, pairs):
    path = tmp_path / "x.bin"
    path.write_bytes(pickle.dumps((pairs[1], pairs[2])))
    assert load_verification_bin(path, size=112).images.shape == (4, 112, 112, 3)


def test_rejects_bad_files(tmp_path, pairs):
    path = tmp_path / "odd.bin"
    path.write_bytes(pickle.dumps((pairs[1][:3], pairs[2])))
    with pytest.raises(ValueError, match="twice as many"):
        load_verification_bin(path)

    class Exploit:
        def __reduce__(self):
            return os.system, ("true",)

    path.write_bytes(pickle.dumps((Exploit(), [])))
    with pytest.raises(pickle.UnpicklingError, match="may not reference"):
        load_verification_bin(path)
