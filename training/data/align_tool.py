"""Raw photos -> aligned face crops: detect, pick one face, align it to a named template, save.

    faceset data align SRC DST --template arcface_112 [--workers N]

SRC is a folder-per-identity tree (SRC/<identity>/<image>) or a flat folder of images; every
image found below SRC (sorted, hidden files skipped) gives DST/<same relative path> as a JPEG
(quality 95; the suffix becomes .jpg, so LFW's Name_0001.jpg keeps its name and pairs.txt still
maps). Each crop is written to a temporary file and moved into place with os.replace, so a crash
never leaves half a JPEG behind.

Every image gets one line in DST/_report.jsonl: its path, status ("aligned", "no_face",
"unreadable"), the chosen face's score, box and 5 landmarks in the *source* image's pixels (so
the same detections can be re-aligned to another template without detecting again), and how
many faces were found. The report is what makes the tool resumable: an image with a line (and,
if aligned, its crop on disk) is skipped, so a second run does nothing and an interrupted run
continues where it stopped; no-face images are not retried. DST/_align.json records the
template and crop size, and a resumed run with different ones is refused rather than mixing
two alignments in one folder.

Which face: "largest" (the default, standard for training data: the labelled person is almost
always the biggest face) or "central": among the faces at least half the largest one's area,
the one whose box centre is nearest the image centre (LFW-style photos, centred on the named
person, where a bystander can be about as big).
"""
from __future__ import annotations

import functools
import json
import logging
import math
import multiprocessing
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import cv2
import numpy as np

from engines.align import align
from engines.atomic import atomic_write_bytes
from engines.detection import Detection, FaceDetector, build_detector
from engines.registry import Registry
from engines.reference_landmarks import get_reference
from training.data.folder import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

REPORT_NAME = "_report.jsonl"
SETTINGS_NAME = "_align.json"
JPEG_QUALITY = 95

# --- which face ---------------------------------------------------------------------------

FACE_PICKERS: Registry = Registry("face picker")


@FACE_PICKERS.register("largest")
def pick_largest(faces: Sequence[Detection], image_shape: tuple[int, ...]) -> Detection:
    """The face with the largest box (the first on ties)."""
    return max(faces, key=lambda f: f.area)  # max keeps the first of equal areas


CENTRAL_MIN_AREA_RATIO = 0.5


@FACE_PICKERS.register("central")
def pick_central(faces: Sequence[Detection], image_shape: tuple[int, ...]) -> Detection:
    """Among faces with area ≥ 0.5 × the largest, the one whose box centre is nearest the image centre.

    The area floor keeps a small background face that happens to sit in the middle from beating
    the subject; pixel centres are at integers, so the image centre is ((W − 1)/2, (H − 1)/2).
    """
    largest = max(f.area for f in faces)
    centre = np.array([(image_shape[1] - 1) / 2, (image_shape[0] - 1) / 2])
    big = [f for f in faces if f.area >= CENTRAL_MIN_AREA_RATIO * largest]

    def distance(face: Detection) -> float:
        x1, y1, x2, y2 = face.bbox
        return float(np.hypot((x1 + x2) / 2 - centre[0], (y1 + y2) / 2 - centre[1]))

    return min(big, key=distance)


# --- files ----------------------------------------------------------------------------------


def list_images(src_root: Path, skip: Path | None = None) -> list[Path]:
    """Relative paths of every image below src_root, sorted; hidden files and the skip folder left out."""
    skip = skip.resolve() if skip is not None else None
    found = []
    for path in sorted(src_root.rglob("*")):
        rel = path.relative_to(src_root)
        if any(part.startswith(".") for part in rel.parts) or path.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        if skip is not None and path.resolve().is_relative_to(skip):
            continue  # DST inside SRC: never align our own output
        if path.is_file():
            found.append(rel)
    return found


def output_path(rel: Path) -> Path:
    """Where an image's crop goes, relative to dst_root: same path, .jpg suffix."""
    return rel.with_suffix(".jpg")


def check_unique_outputs(images: Sequence[Path]) -> None:
    seen: dict[Path, Path] = {}
    for rel in images:
        out = output_path(rel)
        if out in seen:
            raise ValueError(f"{seen[out]} and {rel} would both be written to {out}")
        seen[out] = rel


def read_rgb(path: Path) -> np.ndarray | None:
    """(H, W, 3) uint8 RGB, or None when the file does not decode (grey images come back as RGB)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    return None if bgr is None else cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def write_jpeg(path: Path, image_rgb: np.ndarray, quality: int = JPEG_QUALITY) -> None:
    """Write atomically: a temporary file in the same folder, fsync, os.replace."""
    ok, encoded = cv2.imencode(".jpg", cv2.cvtColor(image_rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, quality])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {path}")
    atomic_write_bytes(path, encoded.tobytes())


def read_report(path: Path) -> dict[str, dict]:
    """Source path -> its latest record. A torn last line (a crash mid-write) is ignored: that image is redone."""
    records: dict[str, dict] = {}
    if not path.exists():
        return records
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        records[record["path"]] = record
    return records


def is_done(record: dict | None, dst_root: Path) -> bool:
    if record is None:
        return False
    return record["status"] != "aligned" or (dst_root / record["output"]).is_file()


# --- one image ------------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignJob:
    """What every image is aligned with (picklable: it travels to worker processes)."""
    src_root: Path
    dst_root: Path
    points: np.ndarray  # (5, 2) template points for a template_size crop
    template_size: int
    size: int
    pick: str


def align_one(job: AlignJob, rel: Path, detector: FaceDetector) -> dict:
    """Detect, pick, align and write one image; its report record."""
    record: dict = {"path": rel.as_posix(), "output": None, "status": "unreadable", "faces": 0,
                    "score": None, "bbox": None, "landmarks": None}
    image = read_rgb(job.src_root / rel)
    if image is None:
        return record
    faces = detector.detect(image)
    record["faces"] = len(faces)
    if not faces:
        record["status"] = "no_face"
        return record
    face = FACE_PICKERS.get(job.pick)(faces, image.shape)
    crop = align(image, face.landmarks, job.size, job.points, job.template_size)
    write_jpeg(job.dst_root / output_path(rel), crop)
    record.update(
        status="aligned",
        output=output_path(rel).as_posix(),
        score=round(float(face.score), 6),
        bbox=[round(float(v), 3) for v in face.bbox],
        landmarks=np.round(np.asarray(face.landmarks, dtype=np.float64), 3).tolist(),
    )
    return record


# --- worker processes -----------------------------------------------------------------------

WORKER_CHUNK = 32  # images per worker task: one detector build is worth that many images


def _align_chunk(job: AlignJob, detector_name: str, detector_kwargs: dict, threads: int,
                 rels: Sequence[Path]) -> list[dict]:
    # each task builds its own detector: ONNX Runtime sessions do not pickle or fork safely
    cv2.setNumThreads(threads)
    detector = build_detector(detector_name, **detector_kwargs)
    return [align_one(job, rel, detector) for rel in rels]


def run_records(job: AlignJob, todo: Sequence[Path], detector: FaceDetector | str, detector_kwargs: dict,
                workers: int, threads: int) -> Iterator[dict]:
    """Records for the todo images, in order (workers = 1) or as they finish (workers > 1)."""
    if workers == 1:
        instance = build_detector(detector, **detector_kwargs) if isinstance(detector, str) else detector
        yield from (align_one(job, rel, instance) for rel in todo)
        return
    # spawn: a fresh interpreter per worker, nothing inherited from the parent's threads
    context = multiprocessing.get_context("spawn")
    chunks = [todo[i : i + WORKER_CHUNK] for i in range(0, len(todo), WORKER_CHUNK)]
    task = functools.partial(_align_chunk, job, detector, detector_kwargs, threads)
    with context.Pool(workers) as pool:
        for records in pool.imap_unordered(task, chunks):
            yield from records


# --- the folder -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AlignReport:
    """What one align_folder call did (images done by an earlier run count as skipped)."""
    images: int  # source images found
    skipped: int
    aligned: int
    no_face: int
    unreadable: int
    seconds: float
    report_path: Path

    @property
    def processed(self) -> int:
        return self.aligned + self.no_face + self.unreadable

    @property
    def detection_rate(self) -> float:
        """aligned / processed in this call (nan when nothing was processed)."""
        return self.aligned / self.processed if self.processed else math.nan


def check_settings(dst_root: Path, settings: dict) -> None:
    """Write DST/_align.json, or refuse when an earlier run used another template or size."""
    path = dst_root / SETTINGS_NAME
    if path.exists():
        before = json.loads(path.read_text())
        keys = ("template", "size", "points")
        if any(before.get(k) != settings[k] for k in keys):
            raise ValueError(f"{dst_root} was aligned with {({k: before.get(k) for k in keys})}, not "
                             f"{({k: settings[k] for k in keys})}: use another destination")
        return
    dst_root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def align_folder(
    src_root: str | Path,
    dst_root: str | Path,
    template: str = "arcface_112",
    size: int | None = None,
    detector: FaceDetector | str | None = None,
    min_face_size: float = 20,
    workers: int = 1,
    pick: str = "largest",
    threads: int = 1,
    progress: Callable[[int, int], None] | None = None,
) -> AlignReport:
    """Align every image below src_root into dst_root (see the module docstring).

    template: a name in engines.reference_landmarks; size: crop side (default the template's own, the
        points scale with it).
    detector: None or a registered detector name ("mtcnn") is built with min_face_size and
        `threads` ONNX Runtime threads, once per process; an instance is used as is (workers = 1 only).
    min_face_size: smallest face searched, pixels; lower finds faces in small photos (slower).
    workers: processes; each builds its own detector.
    pick: "largest" or "central" (FACE_PICKERS).
    progress: called as progress(done, to_do) every 100 images.
    """
    src_root, dst_root = Path(src_root), Path(dst_root)
    if workers < 1:
        raise ValueError(f"workers must be ≥ 1, got {workers}")
    FACE_PICKERS.get(pick)  # fail before any work on an unknown name
    detector = "mtcnn" if detector is None else detector
    if workers > 1 and not isinstance(detector, str):
        raise ValueError("with workers > 1 pass the detector by name: each process builds its own")
    points, template_size = get_reference(template)
    size = template_size if size is None else int(size)
    images = list_images(src_root, skip=dst_root)
    check_unique_outputs(images)
    check_settings(dst_root, {"template": template, "size": size, "points": points.tolist(), "pick": pick,
                              "detector": detector if isinstance(detector, str) else type(detector).__name__,
                              "min_face_size": min_face_size, "source": str(src_root.resolve())})
    report_path = dst_root / REPORT_NAME
    done = read_report(report_path)
    todo = [rel for rel in images if not is_done(done.get(rel.as_posix()), dst_root)]
    job = AlignJob(src_root, dst_root, points, template_size, size, pick)
    kwargs = {"min_face_size": min_face_size, "intra_op_threads": threads} if isinstance(detector, str) else {}
    counts = {"aligned": 0, "no_face": 0, "unreadable": 0}
    start = time.perf_counter()
    with open(report_path, "a") as report:
        for n, record in enumerate(run_records(job, todo, detector, kwargs, workers, threads), 1):
            report.write(json.dumps(record) + "\n")
            report.flush()  # a crash loses at most the line being written
            counts[record["status"]] += 1
            if progress is not None and (n % 100 == 0 or n == len(todo)):
                progress(n, len(todo))
    return AlignReport(len(images), len(images) - len(todo), counts["aligned"], counts["no_face"],
                       counts["unreadable"], time.perf_counter() - start, report_path)


def summarise_report(report_path: Path) -> dict[str, int]:
    """Status -> count over every image the report holds (all runs)."""
    counts: dict[str, int] = {}
    for record in read_report(Path(report_path)).values():
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    return counts


# --- measuring a template -------------------------------------------------------------------


def measure_landmarks(images: Iterable[np.ndarray], detector: FaceDetector, pick: str = "central"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """The picked face's landmarks (K, 5, 2) in each image where a face is found, and those images' indices (K,).

    How engines/reference_landmarks.py's dlib_150 was measured: over crops made by another pipeline, the
    mean of these landmarks is where our detector's points sit in that pipeline's crops.
    """
    picker = FACE_PICKERS.get(pick)
    found, index = [], []
    for i, image in enumerate(images):
        faces = detector.detect(np.ascontiguousarray(image))
        if faces:
            found.append(np.asarray(picker(faces, image.shape).landmarks, dtype=np.float64))
            index.append(i)
    return np.array(found).reshape(-1, 5, 2), np.array(index, dtype=np.int64)
