from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from engines.align import alignment_matrix, transform_points
from engines.detection import Detection, build_detector
from engines.reference_landmarks import get_reference
from training.cli import app
from training.data.align_tool import (
    REPORT_NAME,
    align_folder,
    measure_landmarks,
    pick_central,
    pick_largest,
    read_report,
    read_rgb,
)

# --- synthetic faces: bright blobs at known landmarks, found by a stand-in detector ---------


def similarity(angle: float, scale: float, shift) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[scale * c, -scale * s, shift[0]], [scale * s, scale * c, shift[1]]])


def blob_image(landmarks: np.ndarray, h: int = 240, w: int = 260, sigma: float = 3.0) -> np.ndarray:
    ys, xs = np.mgrid[:h, :w]
    image = np.zeros((h, w))
    for x, y in landmarks:
        image += 250 * np.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))
    return np.repeat(np.clip(image, 0, 255).astype(np.uint8)[:, :, None], 3, axis=2)


def blob_centres(grey: np.ndarray) -> np.ndarray:
    """Intensity-weighted centres of the bright blobs: (K, 2)."""
    count, labels = cv2.connectedComponents((grey > 40).astype(np.uint8))
    ys, xs = np.mgrid[: grey.shape[0], : grey.shape[1]]
    w = grey.astype(np.float64)
    centres = np.array([[(xs * w)[labels == k].sum(), (ys * w)[labels == k].sum()] / w[labels == k].sum()
                        for k in range(1, count)])
    return centres


class KnownFaces:
    """A detector that 'finds' the landmarks the test drew: image bytes -> detections."""

    def __init__(self) -> None:
        self.faces: dict[bytes, list[Detection]] = {}
        self.calls = 0

    def add(self, image: np.ndarray, landmarks: np.ndarray, score: float = 0.99) -> None:
        x1, y1 = landmarks.min(axis=0) - 20
        x2, y2 = landmarks.max(axis=0) + 20
        self.faces[image.tobytes()] = [Detection((x1, y1, x2, y2), score, landmarks)]

    def detect(self, image_rgb: np.ndarray) -> list[Detection]:
        self.calls += 1
        return self.faces.get(image_rgb.tobytes(), [])


def write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))


def make_tree(tmp_path: Path, points: np.ndarray) -> tuple[Path, KnownFaces, dict[str, np.ndarray]]:
    """src/<identity>/<n>.png: three blob faces (the points rotated, scaled, shifted), and a blank image."""
    detector, truth = KnownFaces(), {}
    for i, (rel, angle, scale, shift) in enumerate([("a/0.png", 0.3, 1.6, (70, 20)), ("a/1.png", -0.2, 1.2, (90, 60)),
                                                   ("b/0.png", 0.1, 0.9, (100, 80))]):
        landmarks = transform_points(similarity(angle, scale, shift), points)
        image = blob_image(landmarks)
        write_png(tmp_path / "src" / rel, image)
        detector.add(image, landmarks)
        truth[rel] = landmarks
    write_png(tmp_path / "src" / "b" / "blank.png", np.zeros((90, 80, 3), np.uint8))
    return tmp_path, detector, truth


@pytest.fixture
def blob_tree(tmp_path: Path) -> tuple[Path, KnownFaces, dict[str, np.ndarray]]:
    return make_tree(tmp_path, get_reference("arcface_112")[0])


@pytest.mark.parametrize("template, size", [("arcface_112", None), ("dlib_150", None), ("arcface_112", 224)])
def test_crops_put_the_landmarks_on_the_template(tmp_path, template, size):
    points, template_size = get_reference(template)
    tmp, detector, truth = make_tree(tmp_path, points)
    report = align_folder(tmp / "src", tmp / "dst", template=template, size=size, detector=detector)
    assert (report.images, report.aligned, report.no_face, report.skipped) == (4, 3, 1, 0)
    side = size or template_size
    expected = points.astype(np.float64) * side / template_size
    for rel in truth:
        crop = read_rgb(tmp / "dst" / Path(rel).with_suffix(".jpg"))
        assert crop.shape == (side, side, 3)
        found = blob_centres(crop[:, :, 0])
        assert len(found) == 5
        nearest = found[np.linalg.norm(found[None] - expected[:, None], axis=2).argmin(axis=1)]  # (5, 2)
        np.testing.assert_allclose(nearest, expected, atol=0.35)


def test_report_records_every_image(blob_tree):
    tmp, detector, truth = blob_tree
    align_folder(tmp / "src", tmp / "dst", detector=detector)
    records = read_report(tmp / "dst" / REPORT_NAME)
    assert sorted(records) == ["a/0.png", "a/1.png", "b/0.png", "b/blank.png"]
    blank = records["b/blank.png"]
    assert blank["status"] == "no_face" and blank["output"] is None and blank["faces"] == 0
    assert not (tmp / "dst" / "b" / "blank.jpg").exists()
    for rel, landmarks in truth.items():
        assert records[rel]["status"] == "aligned" and records[rel]["output"] == rel.replace(".png", ".jpg")
        assert records[rel]["score"] == pytest.approx(0.99)
        np.testing.assert_allclose(records[rel]["landmarks"], landmarks, atol=1e-3)  # source pixels, 3 decimals


def test_second_run_does_nothing(blob_tree):
    tmp, detector, _ = blob_tree
    align_folder(tmp / "src", tmp / "dst", detector=detector)
    outputs = sorted((tmp / "dst").rglob("*.jpg"))
    stamps = [p.stat().st_mtime_ns for p in outputs]
    report_text = (tmp / "dst" / REPORT_NAME).read_text()
    calls = detector.calls
    again = align_folder(tmp / "src", tmp / "dst", detector=detector)
    assert (again.skipped, again.processed) == (4, 0)
    assert detector.calls == calls
    assert [p.stat().st_mtime_ns for p in outputs] == stamps
    assert (tmp / "dst" / REPORT_NAME).read_text() == report_text


def test_resume_redoes_only_what_is_missing(blob_tree):
    tmp, detector, _ = blob_tree
    align_folder(tmp / "src", tmp / "dst", detector=detector)
    (tmp / "dst" / "a" / "1.jpg").unlink()  # a crop lost after its report line
    with open(tmp / "dst" / REPORT_NAME, "a") as f:
        f.write('{"path": "b/0.png", "sta')  # a line torn by a crash: ignored...
    lines = (tmp / "dst" / REPORT_NAME).read_text().splitlines()
    (tmp / "dst" / REPORT_NAME).write_text("\n".join(line for line in lines if '"b/0.png", "output"' not in line) + "\n")
    report = align_folder(tmp / "src", tmp / "dst", detector=detector)
    # ...so b/0.png (whose good line was removed) and a/1.png (crop missing) are redone, nothing else
    assert (report.skipped, report.aligned, report.no_face) == (2, 2, 0)
    assert (tmp / "dst" / "a" / "1.jpg").is_file()


def test_unreadable_file_is_reported(blob_tree):
    tmp, detector, _ = blob_tree
    (tmp / "src" / "a" / "broken.jpg").write_bytes(b"not a jpeg")
    report = align_folder(tmp / "src", tmp / "dst", detector=detector)
    assert report.unreadable == 1
    assert read_report(tmp / "dst" / REPORT_NAME)["a/broken.jpg"]["status"] == "unreadable"


def test_changing_template_on_resume_is_refused(blob_tree):
    tmp, detector, _ = blob_tree
    align_folder(tmp / "src", tmp / "dst", detector=detector)
    with pytest.raises(ValueError, match="another destination"):
        align_folder(tmp / "src", tmp / "dst", template="dlib_150", detector=detector)


def test_two_sources_for_one_output_are_refused(tmp_path):
    write_png(tmp_path / "src" / "x.png", np.zeros((8, 8, 3), np.uint8))
    cv2.imwrite(str(tmp_path / "src" / "x.jpg"), np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="both"):
        align_folder(tmp_path / "src", tmp_path / "dst", detector=KnownFaces())


def test_workers_need_a_detector_name(blob_tree):
    tmp, detector, _ = blob_tree
    with pytest.raises(ValueError, match="by name"):
        align_folder(tmp / "src", tmp / "dst", detector=detector, workers=2)


def test_blank_image_has_no_face_with_the_real_detector(tmp_path):
    """The shipped MTCNN on a blank photo, through the command line; the report and summary say no face."""
    write_png(tmp_path / "src" / "blank.png", np.full((120, 100, 3), 128, np.uint8))
    result = CliRunner().invoke(app, ["data", "align", str(tmp_path / "src"), str(tmp_path / "dst")])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert (summary["images"], summary["aligned"], summary["no_face"]) == (1, 0, 1)
    assert read_report(tmp_path / "dst" / REPORT_NAME)["blank.png"]["status"] == "no_face"
    assert json.loads((tmp_path / "dst" / "_align.json").read_text())["template"] == "arcface_112"


# --- which face -------------------------------------------------------------------------------


def face(x1: float, y1: float, side: float) -> Detection:
    return Detection((x1, y1, x1 + side, y1 + side), 0.9, np.zeros((5, 2)))


def test_pick_largest():
    faces = [face(0, 0, 30), face(50, 50, 40), face(100, 0, 35)]
    assert pick_largest(faces, (200, 200, 3)) is faces[1]


def test_pick_central_prefers_the_centre_among_similar_sizes():
    shape = (200, 300, 3)  # centre (149.5, 99.5)
    big_corner, near_centre, tiny_centre = face(0, 0, 60), face(110, 60, 50), face(140, 90, 20)
    # 50² ≥ 0.5 · 60²: similar enough, and nearer the centre
    assert pick_central([big_corner, near_centre], shape) is near_centre
    # 20² < 0.5 · 60²: a small face in the middle does not beat the subject
    assert pick_central([big_corner, tiny_centre], shape) is big_corner


# --- real photos ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mtcnn():
    return build_detector("mtcnn", intra_op_threads=1)


def few_celeba(data_dir: Path, tmp: Path) -> Path:
    """Two identities × three photos of celeba-299, copied into a temporary tree."""
    src = data_dir / "celeba-299"
    for identity in sorted(p.name for p in src.iterdir())[:2]:
        (tmp / "src" / identity).mkdir(parents=True)
        for path in sorted((src / identity).glob("*.jpg"))[:3]:
            shutil.copy(path, tmp / "src" / identity / path.name)
    return tmp / "src"


@pytest.mark.data
@pytest.mark.parametrize("template", ["arcface_112", "dlib_150"])
def test_real_crops_redetect_on_the_template(data_dir, tmp_path, mtcnn, template):
    src = few_celeba(data_dir, tmp_path)
    report = align_folder(src, tmp_path / "dst", template=template, detector=mtcnn)
    assert report.aligned == 6 and report.skipped == 0
    points, size = get_reference(template)
    redetected, to_template = [], []
    for rel, record in read_report(tmp_path / "dst" / REPORT_NAME).items():
        crop = read_rgb(tmp_path / "dst" / record["output"])
        assert crop.shape == (size, size, 3)
        again = mtcnn.detect(crop)[0].landmarks
        # where the alignment sent the photo's landmarks (a real face never fits the template exactly)
        sent = transform_points(alignment_matrix(np.array(record["landmarks"]), size, points, size), record["landmarks"])
        redetected.append(np.linalg.norm(again - sent, axis=1).mean())
        to_template.append(np.linalg.norm(again - points, axis=1).mean())
    print(f"{template}: re-detected vs sent {np.round(redetected, 2)}, vs template {np.round(to_template, 2)}")
    # pixel errors grow with the face's size in the crop: measure them in interocular distances
    # (35 px in arcface_112, 55 px in dlib_150); MTCNN's own landmark jitter is a few percent of it
    interocular = np.linalg.norm(points[1] - points[0])
    assert max(redetected) < 0.12 * interocular and np.median(redetected) < 0.06 * interocular
    assert max(to_template) < 0.2 * interocular  # within a few pixels: 7 px at 112, 11 px at 150
    assert align_folder(src, tmp_path / "dst", template=template, detector=mtcnn).processed == 0


@pytest.mark.data
def test_flat_folder_keeps_file_names(data_dir, tmp_path, mtcnn):
    src = tmp_path / "src"
    src.mkdir()
    names = sorted(p.name for p in (data_dir / "lfw-dev" / "images").glob("*.jpg"))[:3]
    for name in names:
        shutil.copy(data_dir / "lfw-dev" / "images" / name, src / name)
    report = align_folder(src, tmp_path / "dst", template="dlib_150", detector=mtcnn, pick="central")
    assert report.aligned == 3
    assert sorted(p.name for p in (tmp_path / "dst").glob("*.jpg")) == names


@pytest.mark.data
def test_workers_give_the_same_crops(data_dir, tmp_path):
    src = few_celeba(data_dir, tmp_path)
    one = align_folder(src, tmp_path / "one", workers=1)
    two = align_folder(src, tmp_path / "two", workers=2)
    assert one.aligned == two.aligned == 6
    for path in sorted((tmp_path / "one").rglob("*.jpg")):
        assert (tmp_path / "two" / path.relative_to(tmp_path / "one")).read_bytes() == path.read_bytes()
    assert read_report(tmp_path / "one" / REPORT_NAME) == read_report(tmp_path / "two" / REPORT_NAME)


@pytest.mark.data
def test_measure_landmarks_finds_the_template_on_aligned_crops(data_dir, tmp_path, mtcnn):
    """The dlib_150 measurement, run on our own dlib_150 crops, lands back near the template."""
    src = few_celeba(data_dir, tmp_path)
    align_folder(src, tmp_path / "dst", template="dlib_150", detector=mtcnn)
    crops = [read_rgb(p) for p in sorted((tmp_path / "dst").rglob("*.jpg"))]
    landmarks, index = measure_landmarks(crops, mtcnn)
    assert landmarks.shape == (6, 5, 2) and index.tolist() == list(range(6))
    points, _ = get_reference("dlib_150")
    assert np.linalg.norm(landmarks.mean(axis=0) - points, axis=1).max() < 4.0
