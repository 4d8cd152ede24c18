"""RecordIO: the reader against bytes laid out by hand from the documented format, and round trips.

The hand encoder below writes parts literally (struct.pack of magic, cflag<<29|length, data,
padding), so it shares no code with training.data.recordio.
"""
from __future__ import annotations

import pickle
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from training.data import FolderFaceDataset, RecordFaceDataset, build_dataset, folder_to_recordio
from training.data.recordio import (
    IRHeader,
    RecordReader,
    RecordWriter,
    encode_record,
    iter_records,
    pack,
    resolve_paths,
    unpack,
)
from tests.training.data.images import encode, expected_tensor, image_array

MAGIC = struct.pack("<I", 0xCED7230A)


def part(cflag: int, data: bytes) -> bytes:
    """One on-disk part: magic, lrecord, data (no padding)."""
    return MAGIC + struct.pack("<I", (cflag << 29) | len(data)) + data


def pad(raw: bytes) -> bytes:
    return raw + b"\0" * (-len(raw) % 4)


def ir(flag: int, label: float, id_: int, id2: int) -> bytes:
    return struct.pack("<IfQQ", flag, label, id_, id2)


# --- record framing ---------------------------------------------------------------------------


def test_single_part_with_padding():
    payload = b"hello"
    assert encode_record(payload) == part(0, b"hello") + b"\0\0\0"


def test_unaligned_magic_does_not_split():
    payload = b"ab" + MAGIC + b"cd"  # magic at offset 2
    assert encode_record(payload) == part(0, payload)


def test_aligned_magic_splits_into_parts():
    a, b, c = b"AAAA", b"BBBBBBBB", b"CC"
    payload = a + MAGIC + b + MAGIC + c
    want = part(1, a) + part(2, b) + part(3, c) + b"\0\0"
    assert encode_record(payload) == want


def test_payload_ending_in_magic_has_empty_last_part():
    assert encode_record(b"WXYZ" + MAGIC) == part(1, b"WXYZ") + part(3, b"")


# --- reading a file written by hand -----------------------------------------------------------


def hand_written_file(tmp_path: Path) -> tuple[Path, list[np.ndarray]]:
    """insightface layout: header (flag 2, label [3, 5]); images 1, 2; identities 3, 4."""
    images = [image_array(1), image_array(2, h=16, w=16)]
    records = {
        0: pad(part(0, ir(2, 0.0, 0, 0) + struct.pack("<2f", 3.0, 5.0))),
        1: pad(part(0, ir(0, 0.0, 1, 0) + encode(images[0]))),
        # id = magic and id2 = magic twice put aligned magics at payload offsets 8, 16 and 20,
        # so this record is four parts: [0:8], [12:16], [20:20] (empty) and [24:]
        2: pad(
            part(1, ir(0, 1.0, 0, 0)[:8])
            + part(2, b"\0\0\0\0")
            + part(2, b"")
            + part(3, encode(images[1]))
        ),
        3: pad(part(0, ir(2, 0.0, 3, 0) + struct.pack("<2f", 1.0, 2.0))),
        4: pad(part(0, ir(2, 0.0, 4, 0) + struct.pack("<2f", 2.0, 3.0))),
    }
    data, index, offset = b"", "", 0
    for key in sorted(records):
        index += f"{key}\t{offset}\n"
        data += records[key]
        offset += len(records[key])
    (tmp_path / "train.rec").write_bytes(data)
    (tmp_path / "train.idx").write_text(index)
    return tmp_path, images


def test_reader_parses_hand_written_file(tmp_path):
    root, images = hand_written_file(tmp_path)
    reader = RecordReader(*resolve_paths(root))
    header, rest = unpack(reader.read(0))
    assert header.flag == 2 and rest == b""
    np.testing.assert_array_equal(header.label, [3.0, 5.0])
    header, png = unpack(reader.read(2))
    assert header == IRHeader(0, 1.0, 0xCED7230A, 0xCED7230A_CED7230A)  # the magics were restored
    assert png == encode(images[1])
    assert reader.read_header(2) == header  # a header cut by part breaks falls back to a full read
    np.testing.assert_array_equal(reader.read_header(4).label, [2.0, 3.0])
    with pytest.raises(KeyError):
        reader.read(5)


def test_dataset_over_hand_written_file(tmp_path):
    root, images = hand_written_file(tmp_path)
    ds = RecordFaceDataset(root, size=None)
    assert len(ds) == 2 and ds.num_classes == 2 and ds.identity_range == (3, 5)
    for i, arr in enumerate(images):
        x, y = ds[i]
        assert y == i and x.dtype == torch.float32
        np.testing.assert_allclose(x.numpy(), expected_tensor(arr), atol=1e-6)


def test_iter_records_walks_the_file(tmp_path):
    root, _ = hand_written_file(tmp_path)
    reader = RecordReader(*resolve_paths(root))
    walked = list(iter_records(root / "train.rec"))
    assert [o for o, _ in walked] == reader.offsets.tolist()
    assert [p for _, p in walked] == [reader.read(k) for k in range(5)]


def test_file_without_header_uses_every_key(tmp_path):
    labels = [4, 0, 7]
    with RecordWriter(tmp_path / "x.rec", tmp_path / "x.idx") as w:
        for key, label in enumerate(labels):  # key 0 is an image, flag 0
            w.write(key, pack(IRHeader(0, float(label), key, 0), encode(image_array(key))))
    ds = RecordFaceDataset(tmp_path / "x", size=None)
    assert len(ds) == 3 and ds.identity_range is None
    assert ds.targets == labels and ds.num_classes == 8 and ds[2][1] == 7
    # filtering drops identities without images too, and renumbers the rest in stored order
    kept = RecordFaceDataset(tmp_path / "x", size=None, exclude=["4"])
    assert kept.classes == ["0", "7"] and kept.targets == [0, 1] and kept.image_keys.tolist() == [1, 2]
    assert kept[1][1] == 1


# --- writer round trips -----------------------------------------------------------------------


def test_writer_matches_hand_layout_and_reads_back(tmp_path):
    rng = np.random.default_rng(0)
    payloads = [rng.bytes(n) for n in (0, 1, 7, 64)] + [b"1234" + MAGIC + MAGIC + b"tail!"]
    with RecordWriter(tmp_path / "t.rec", tmp_path / "t.idx") as w:
        for key, p in enumerate(payloads):
            w.write(10 + key, p)
    want = pad(part(0, b"")) + b"".join(pad(part(0, p)) for p in payloads[1:4])
    want += pad(part(1, b"1234") + part(2, b"") + part(3, b"tail!"))
    assert (tmp_path / "t.rec").read_bytes() == want
    reader = RecordReader(tmp_path / "t.rec", tmp_path / "t.idx")
    assert reader.keys.tolist() == [10, 11, 12, 13, 14]
    assert [reader.read(10 + k) for k in range(5)] == payloads


def test_writer_failure_leaves_nothing(tmp_path):
    with pytest.raises(ValueError):
        with RecordWriter(tmp_path / "t.rec", tmp_path / "t.idx") as w:
            w.write(0, b"x")
            w.write(0, b"y")  # duplicate key
    assert list(tmp_path.iterdir()) == []


def test_pack_label_array_sets_flag():
    record = pack(IRHeader(0, [1.5, 2.5, 3.5], 9, 8), b"img")
    assert record == ir(3, 0.0, 9, 8) + struct.pack("<3f", 1.5, 2.5, 3.5) + b"img"
    assert pack(IRHeader(5, 2.0, 1, 0), b"") == ir(0, 2.0, 1, 0)  # a number label means flag 0


def jpeg_tree(root: Path) -> None:
    for name, count in [("10", 2), ("7", 3), ("8", 1)]:
        (root / name).mkdir(parents=True)
        for n in range(count):
            Image.fromarray(image_array(int(name) * 10 + n)).save(root / name / f"{n}.jpg", quality=90)


def test_folder_to_recordio_round_trip(tmp_path):
    jpeg_tree(tmp_path / "src")
    rec, idx = folder_to_recordio(tmp_path / "src", tmp_path / "out" / "train")
    folder = FolderFaceDataset(tmp_path / "src", size=None)
    ds = RecordFaceDataset(tmp_path / "out", size=None)
    assert len(ds) == len(folder) == 6 and ds.num_classes == 3
    for i in range(len(ds)):
        (x, y), (fx, fy) = ds[i], folder[i]
        assert y == fy and torch.equal(x, fx)  # JPEG bytes are copied, so decoding is identical
    reader = RecordReader(rec, idx)
    np.testing.assert_array_equal(unpack(reader.read(0))[0].label, [7, 10])
    # identity records hold each class's [first, end) image keys: "10" keys 1-2, "7" 3-5, "8" 6
    spans = [unpack(reader.read(k))[0].label.tolist() for k in (7, 8, 9)]
    assert spans == [[1, 3], [3, 6], [6, 7]]
    assert unpack(reader.read(1))[1] == (tmp_path / "src" / "10" / "0.jpg").read_bytes()


def test_filters_match_the_folder_dataset(tmp_path):
    jpeg_tree(tmp_path / "src")
    folder_to_recordio(tmp_path / "src", tmp_path / "train")
    assert RecordFaceDataset(tmp_path / "train").classes == ["0", "1", "2"]
    opts = dict(size=None, crop=None, min_images_per_class=2, max_classes=None, exclude=[], transform=None)
    ds = build_dataset("recordio", root=tmp_path / "train", **opts)  # the keywords every dataset takes
    folder = build_dataset("folder", root=tmp_path / "src", **opts)
    assert ds.num_classes == folder.num_classes == 2 and ds.targets == folder.targets == [0, 0, 1, 1, 1]
    assert all(torch.equal(ds[i][0], folder[i][0]) and ds[i][1] == folder[i][1] for i in range(len(ds)))
    one = RecordFaceDataset(tmp_path / "train", max_classes=1, exclude=["0"])
    assert one.classes == ["1"] and len(one) == 3 and one[2][1] == 0


def test_folder_to_recordio_resizes(tmp_path):
    jpeg_tree(tmp_path / "src")
    folder_to_recordio(tmp_path / "src", tmp_path / "small", size=16, max_classes=2)
    ds = RecordFaceDataset(tmp_path / "small.rec", size=None)
    assert len(ds) == 5 and ds.num_classes == 2 and ds[0][0].shape == (3, 16, 16)


# --- safe to share between workers ------------------------------------------------------------


def test_pickles_without_open_files_and_reads_in_threads(tmp_path):
    jpeg_tree(tmp_path / "src")
    folder_to_recordio(tmp_path / "src", tmp_path / "train")
    ds = RecordFaceDataset(tmp_path / "train", size=None)
    assert ds.reader._fd is None  # construction leaves nothing open
    first = ds[0][0]
    clone = pickle.loads(pickle.dumps(ds))  # after a read the descriptor is open, but not pickled
    assert clone.reader._fd is None and torch.equal(clone[0][0], first)
    sequential = [ds[i][0] for i in range(len(ds))] * 4
    with ThreadPoolExecutor(4) as pool:
        threaded = list(pool.map(lambda i: ds[i % len(ds)][0], range(4 * len(ds))))
    assert all(torch.equal(a, b) for a, b in zip(sequential, threaded))


def test_dataloader_workers_read_the_same(tmp_path):
    jpeg_tree(tmp_path / "src")
    folder_to_recordio(tmp_path / "src", tmp_path / "train")
    ds = RecordFaceDataset(tmp_path / "train", size=None)
    ds[0]  # open the file in the parent first: workers must not reuse its descriptor state
    loader = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context="fork")
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert torch.equal(images, torch.stack([ds[i][0] for i in range(len(ds))]))
    assert labels.tolist() == [0, 0, 1, 1, 1, 2]
