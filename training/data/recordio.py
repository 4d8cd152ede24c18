"""insightface RecordIO datasets (``train.rec`` + ``train.idx``), read and written without mxnet.

Record layout (dmlc-core recordio, little-endian):
  [uint32 magic 0xced7230a][uint32 lrecord][payload][zero padding to a multiple of 4]
  lrecord = cflag << 29 | length. A payload containing the magic at a 4-byte-aligned offset is
  split there into parts (the magic itself is dropped): cflag 0 = whole record, 1 = first part,
  2 = middle part, 3 = last part; the reader joins the parts with the magic between them.

Payload (mxnet.recordio.pack): IRHeader struct "IfQQ" = (flag uint32, label float32, id uint64,
id2 uint64), 24 bytes; when flag > 0 the label is the `flag` float32 values that follow the
header (and the header's own label field is 0); then the image bytes.

Index (``.idx``): one text line per record, ``key<TAB>byte offset``.

insightface's layout: record 0 is a header with label (a, b); images are keys 1..a−1; keys a..b−1
are one record per identity with label (first image key, end image key). A file whose record 0
has flag 0 has no header: every key is an image.
"""
from __future__ import annotations

import io
import os
import struct
import threading
from enum import IntEnum
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from training.data import DATASETS
from training.data.folder import FolderFaceDataset, select_identities
from training.data.transforms import Preprocess, check_box, crop_resize, load_rgb

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_PART_HEADER = struct.Struct("<II")  # magic, lrecord
_LENGTH_BITS = 29
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_IR_HEADER = struct.Struct("<IfQQ")  # flag, label, id, id2; 24 bytes, as mxnet's native "IfQQ" on x86


class CFlag(IntEnum):
    FULL = 0
    START = 1
    MIDDLE = 2
    END = 3


def encode_lrecord(cflag: int, length: int) -> int:
    if length > _LENGTH_MASK:
        raise ValueError(f"a RecordIO part holds at most {_LENGTH_MASK} bytes, got {length}")
    return (cflag << _LENGTH_BITS) | length


def decode_lrecord(lrecord: int) -> tuple[int, int]:
    """(cflag, length) of an lrecord word."""
    return (lrecord >> _LENGTH_BITS) & 7, lrecord & _LENGTH_MASK


def _padded(length: int) -> int:
    return (length + 3) & ~3


def _aligned_magic_offsets(payload: bytes) -> list[int]:
    """Offsets i ≡ 0 (mod 4), i + 4 <= len, where the payload holds the magic; these split the record."""
    found, start = [], 0
    while (i := payload.find(_MAGIC_BYTES, start)) >= 0:
        if i % 4 == 0:
            found.append(i)
            start = i + 4
        else:
            start = i + 1
    return found


def encode_record(payload: bytes) -> bytes:
    """The on-disk bytes of one record, splitting at aligned magics exactly as dmlc's writer does."""
    cuts = _aligned_magic_offsets(payload)
    starts = [0] + [i + 4 for i in cuts]
    stops = cuts + [len(payload)]
    flags = [CFlag.FULL] if not cuts else [CFlag.START] + [CFlag.MIDDLE] * (len(cuts) - 1) + [CFlag.END]
    out = bytearray()
    for cflag, a, b in zip(flags, starts, stops):
        out += _PART_HEADER.pack(MAGIC, encode_lrecord(cflag, b - a)) + payload[a:b]
    # only the last part can be unaligned: every cut lies at a multiple of 4
    out += b"\0" * (_padded(len(out)) - len(out))
    return bytes(out)


def decode_record(read: Callable[[int, int], bytes], offset: int) -> tuple[bytes, int]:
    """(payload, offset of the next record) of the record at `offset`; read(n, offset) gives n bytes."""
    parts: list[bytes] = []
    while True:
        head = read(_PART_HEADER.size, offset)
        if len(head) != _PART_HEADER.size:
            raise ValueError(f"truncated RecordIO part header at byte {offset}")
        magic, lrecord = _PART_HEADER.unpack(head)
        if magic != MAGIC:
            raise ValueError(f"bad RecordIO magic {magic:#010x} at byte {offset}")
        cflag, length = decode_lrecord(lrecord)
        data = read(length, offset + _PART_HEADER.size)
        if len(data) != length:
            raise ValueError(f"truncated RecordIO record at byte {offset}")
        parts.append(data)
        offset += _PART_HEADER.size + _padded(length)
        if cflag in (CFlag.FULL, CFlag.END):
            return _MAGIC_BYTES.join(parts), offset


class IRHeader(NamedTuple):
    flag: int
    label: float | np.ndarray  # a float, or (flag,) float32 values when flag > 0
    id: int
    id2: int


def pack(header: IRHeader | Sequence, payload: bytes = b"") -> bytes:
    """IRHeader + payload as mxnet.recordio.pack: the flag is set from the label (0 for a number,
    its length for an array, which then follows the header)."""
    _, label, id_, id2 = header
    if np.ndim(label) == 0:
        return _IR_HEADER.pack(0, float(label), id_, id2) + payload
    values = np.asarray(label, dtype="<f4").ravel()
    return _IR_HEADER.pack(values.size, 0.0, id_, id2) + values.tobytes() + payload


def unpack(record: bytes) -> tuple[IRHeader, bytes]:
    """(IRHeader, payload) of a record, as mxnet.recordio.unpack."""
    flag, label, id_, id2 = _IR_HEADER.unpack_from(record)
    rest = record[_IR_HEADER.size :]
    if flag > 0:
        label = np.frombuffer(rest, dtype="<f4", count=flag).copy()
        rest = rest[4 * flag :]
    return IRHeader(flag, label, id_, id2), rest


def header_label(header: IRHeader) -> int:
    """The class of an image record: the label, or its first value when the label is an array."""
    return int(header.label if header.flag == 0 else header.label[0])


def read_index(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(keys, offsets) from a ``.idx`` file, both int64, sorted by key."""
    fields = Path(path).read_bytes().split()
    table = np.array(fields, dtype=np.int64).reshape(-1, 2) if fields else np.zeros((0, 2), np.int64)  # (N, 2)
    order = np.argsort(table[:, 0], kind="stable")
    keys, offsets = table[order, 0], table[order, 1]
    if np.any(keys[1:] == keys[:-1]):
        raise ValueError(f"{path} lists a key twice")
    return keys, offsets


def resolve_paths(path: str | Path) -> tuple[Path, Path]:
    """(.rec, .idx) for a folder holding train.rec, a .rec file, or a prefix such as data/train."""
    path = Path(path)
    if path.is_dir():
        path = path / "train.rec"
    prefix = path.with_suffix("") if path.suffix == ".rec" else path
    return prefix.with_name(prefix.name + ".rec"), prefix.with_name(prefix.name + ".idx")


class RecordReader:
    """Random access to an indexed RecordIO file by key.

    The file is opened lazily, once per process (DataLoader workers reopen after fork or spawn),
    and read with os.pread, which has no shared file position, so threads can share a reader.
    Nothing open is pickled.
    """

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self.keys, self.offsets = read_index(self.idx_path)
        self._fd: int | None = None
        self._pid: int | None = None
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_fd", "_pid", "_lock")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _fd=None, _pid=None, _lock=threading.Lock())

    def _descriptor(self) -> int:
        pid = os.getpid()
        if self._fd is None or self._pid != pid:
            with self._lock:
                if self._fd is None or self._pid != pid:
                    # a descriptor inherited through fork is left to the parent that opened it
                    self._fd, self._pid = os.open(self.rec_path, os.O_RDONLY), pid
        return self._fd

    def _pread(self, n: int, offset: int) -> bytes:
        return os.pread(self._descriptor(), n, offset)

    def offset(self, key: int) -> int:
        i = int(np.searchsorted(self.keys, key))
        if i == len(self.keys) or self.keys[i] != key:
            raise KeyError(f"key {key} is not in {self.idx_path}")
        return int(self.offsets[i])

    def __contains__(self, key: int) -> bool:
        i = int(np.searchsorted(self.keys, key))
        return i < len(self.keys) and self.keys[i] == key

    def __len__(self) -> int:
        return len(self.keys)

    def read(self, key: int) -> bytes:
        """The payload stored under key (parts joined)."""
        return decode_record(self._pread, self.offset(key))[0]

    def read_header(self, key: int) -> IRHeader:
        """Only the IRHeader of a record: reads a few dozen bytes instead of the whole image."""
        offset = self.offset(key)
        magic, lrecord = _PART_HEADER.unpack(self._pread(_PART_HEADER.size, offset))
        cflag, length = decode_lrecord(lrecord)
        head = self._pread(min(length, _IR_HEADER.size), offset + _PART_HEADER.size)
        flag = _IR_HEADER.unpack_from(head)[0] if len(head) == _IR_HEADER.size else 0
        need = _IR_HEADER.size + 4 * flag
        if magic != MAGIC or length < need:
            # a bad magic raises, and a header cut by a part break needs the joined record
            return unpack(self.read(key))[0]
        return unpack(self._pread(need, offset + _PART_HEADER.size))[0]

    def close(self) -> None:
        # getattr: __del__ also runs on a reader whose __init__ failed before the descriptor existed
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)
        self._fd = self._pid = None

    def __del__(self) -> None:
        self.close()


def iter_records(rec_path: str | Path) -> Iterator[tuple[int, bytes]]:
    """(offset, payload) of every record in file order, without an index."""
    with open(rec_path, "rb") as f:
        def read(n: int, offset: int) -> bytes:
            f.seek(offset)
            return f.read(n)

        end, offset = os.fstat(f.fileno()).st_size, 0
        while offset < end:
            payload, next_offset = decode_record(read, offset)
            yield offset, payload
            offset = next_offset


class RecordWriter:
    """Writes a .rec and its .idx; both land atomically (temp file, fsync, os.replace) on close."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        self.rec_path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = [p.with_name(p.name + ".tmp") for p in (self.rec_path, self.idx_path)]
        self._rec = open(self._tmp[0], "wb")
        self._idx = open(self._tmp[1], "w", encoding="ascii")
        self._keys: set[int] = set()
        self._offset = 0

    def write(self, key: int, record: bytes) -> None:
        """Append one record (an IRHeader-packed payload, see `pack`) under key."""
        if key in self._keys:
            raise ValueError(f"key {key} written twice")
        data = encode_record(record)
        self._rec.write(data)
        self._idx.write(f"{key}\t{self._offset}\n")
        self._keys.add(key)
        self._offset += len(data)

    def close(self) -> None:
        for f in (self._rec, self._idx):
            f.flush()
            os.fsync(f.fileno())
            f.close()
        for tmp, final in zip(self._tmp, (self.rec_path, self.idx_path)):
            os.replace(tmp, final)

    def abort(self) -> None:
        for f, tmp in zip((self._rec, self._idx), self._tmp):
            f.close()
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()  # a half-written file must not replace a good one


@DATASETS.register("recordio")
class RecordFaceDataset(Dataset):
    """Map-style dataset over an insightface RecordIO file, yielding (float32 (3, size, size), label).

    Identities have no names in a RecordIO file: `classes` holds the stored labels as strings,
    and `exclude` takes those strings. The filters keep the folder dataset's meaning and, like it,
    renumber the kept identities 0..C−1 in stored order; using any of them reads every record's
    header once at construction.

    Args:
        root: folder holding train.rec/train.idx, a .rec file, or a prefix (``data/train``).
        size, crop, min_images_per_class, max_classes, exclude, transform: as for FolderFaceDataset.
    """

    def __init__(
        self,
        root: str | Path,
        size: int | None = 112,
        crop: Sequence[float] | None = None,
        min_images_per_class: int = 1,
        max_classes: int | None = None,
        exclude: Iterable[str] = (),
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> None:
        self.reader = RecordReader(*resolve_paths(root))
        self.preprocess = Preprocess(size, crop)
        self.transform = transform
        self.image_keys, self.identity_range = self._read_layout()
        self._stored: list[int] | None = None  # stored label of every image, read on demand
        exclude = set(exclude)
        if min_images_per_class > 1 or max_classes is not None or exclude:
            self._select(min_images_per_class, max_classes, exclude)
        else:
            self._label_map = None  # stored labels are used as they are
            self.classes = [str(c) for c in range(self._stored_num_classes())]
        self.reader.close()  # reading headers opened the file; every worker opens its own

    def _read_layout(self) -> tuple[np.ndarray, tuple[int, int] | None]:
        """(image keys, identity record range) from record 0, as insightface reads it."""
        first = self.reader.read_header(0) if 0 in self.reader else None
        if first is None or first.flag == 0:
            return self.reader.keys.copy(), None  # no header: every record is an image
        a, b = int(first.label[0]), int(first.label[1])
        return np.arange(1, a, dtype=np.int64), ((a, b) if b > a else None)

    def _stored_labels(self) -> list[int]:
        if self._stored is None:
            self._stored = [header_label(self.reader.read_header(int(k))) for k in self.image_keys]
        return self._stored

    def _stored_num_classes(self) -> int:
        """From the identity records when the file has them, else 1 + the largest label (a scan)."""
        if self.identity_range is not None:
            return self.identity_range[1] - self.identity_range[0]
        return max(self._stored_labels(), default=-1) + 1

    def _select(self, min_images_per_class: int, max_classes: int | None, exclude: set[str]) -> None:
        stored = np.asarray(self._stored_labels(), dtype=np.int64)
        counts = np.bincount(stored, minlength=self._stored_num_classes())
        names = select_identities({str(c): int(n) for c, n in enumerate(counts)}, min_images_per_class, max_classes,
                                  exclude)
        kept = [int(name) for name in names]
        if not kept:
            raise ValueError(f"no identity in {self.reader.rec_path} passes the filters")
        self._label_map = np.full(len(counts), -1, dtype=np.int64)  # stored label -> ours, −1 dropped
        self._label_map[kept] = np.arange(len(kept))
        keep = self._label_map[stored] >= 0
        self.image_keys, self._stored = self.image_keys[keep], stored[keep].tolist()
        self.classes = [str(c) for c in kept]

    def _label(self, stored: int) -> int:
        return stored if self._label_map is None else int(self._label_map[stored])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def targets(self) -> list[int]:
        """The label of every image (read from the record headers once, then cached)."""
        return [self._label(t) for t in self._stored_labels()]

    def __len__(self) -> int:
        return len(self.image_keys)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        header, image = unpack(self.reader.read(int(self.image_keys[index])))
        x = self.preprocess(image)  # (3, H, W)
        if self.transform is not None:
            x = self.transform(x)
        return x, self._label(header_label(header))


def _image_bytes(path: Path, size: int | None, crop: tuple | None, quality: int) -> bytes:
    """JPEG bytes of one image: a JPEG stored as-is when nothing changes, else re-encoded."""
    if size is None and crop is None and path.suffix.lower() in (".jpg", ".jpeg"):
        return path.read_bytes()
    buf = io.BytesIO()
    crop_resize(load_rgb(path), size, crop).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def identity_spans(labels: Sequence[int]) -> list[tuple[int, int]]:
    """[first, end) image keys (images start at key 1) of each label, which must be contiguous."""
    spans: list[tuple[int, int]] = []
    for key, label in enumerate(labels, start=1):
        if label == len(spans):
            spans.append((key, key + 1))
        elif label == len(spans) - 1:
            spans[-1] = (spans[-1][0], key + 1)
        else:
            raise ValueError("labels must be 0, 1, 2, ... in contiguous runs")
    return spans


def folder_to_recordio(
    src_root: str | Path,
    dst_prefix: str | Path,
    size: int | None = None,
    crop: Sequence[float] | None = None,
    quality: int = 95,
    **filters,
) -> tuple[Path, Path]:
    """Convert root/<identity>/<image> to dst_prefix.rec/.idx in insightface's layout.

    JPEGs are copied byte for byte unless size or crop asks for a change; other formats (and
    changed images) are encoded as JPEG at `quality`. `filters` are FolderFaceDataset's
    (min_images_per_class, max_classes, exclude). Returns the (.rec, .idx) paths.
    """
    crop = check_box(crop)
    folder = FolderFaceDataset(src_root, **filters)  # only its listing and labels are used
    labels = folder.targets
    spans = identity_spans(labels)
    first_identity = len(labels) + 1
    rec_path, idx_path = resolve_paths(dst_prefix)
    with RecordWriter(rec_path, idx_path) as writer:
        writer.write(0, pack(IRHeader(0, [first_identity, first_identity + len(spans)], 0, 0)))
        for key, (path, label) in enumerate(folder.samples, start=1):
            writer.write(key, pack(IRHeader(0, float(label), key, 0), _image_bytes(path, size, crop, quality)))
        for c, span in enumerate(spans):
            writer.write(first_identity + c, pack(IRHeader(0, list(span), first_identity + c, 0)))
    return rec_path, idx_path
