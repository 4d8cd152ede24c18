"""Export a trained backbone to ONNX plus a model card, checked against torch before anything is kept.

    faceset export runs/NAME/backbone.pt --out models/NAME --name NAME --version 1 \\
        --licence "…" [--data-licence "…"] [--template arcface_112] [--parity-dir DIR] [--card overrides.yaml] [--style]

Reads either checkpoint faceset writes for a backbone: `Trainer.export_final`'s backbone.pt
({"backbone": state_dict, "arch", "embedding_size", "kwargs", "input_size", "config", …}) or
`training.convert.dlib_resnet`'s ({"state_dict", "arch", "embedding_size", "input_size", "source", …}).

The exported graph takes the card-preprocessed input, x = (p − mean)/std in the card's channel
order. Our backbones read (p − 127.5)/127.5 RGB, so the card says mean 127.5, std 127.5, RGB and
the graph is the bare backbone; a card override with other scaling or BGR gets the conversion
folded into the graph (`ExportModule`).

Parity: the ONNX, run by `engines.onnx_runtime.OnnxRuntimeEngine` through the card's own
preprocessing, is compared with the torch backbone fed independently scaled input, on real
aligned faces when given (random pixels otherwise): every face's embeddings must agree with
cosine ≥ 0.9999 and magnitudes within 0.1% (the magnitude is the quality). Failing that, the
export raises and leaves no file behind. The ONNX is written to a temp file, fsynced and moved
into place only after parity holds; card.yaml (with the ONNX's sha256) is written atomically after.

`style_outputs=True` adds a second output "style" for CAFace: for each map of the backbone's
`forward_intermediates` (shallowest first), the per-channel mean and standard deviation over
positions, interleaved per channel and concatenated over maps, (B, 2·Σ C_i) (`style_statistics`).

Official MagFace checkpoints (iResNet .pth, `features.module.` keys) export with
`export_magface_checkpoint`: the card states MagFace's own input (BGR, p/255) and the ONNX takes it.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import cv2
import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from engines.base import preprocess
from engines.model_card import (
    CARD_FILENAME,
    ModelCard,
    deep_merge,
    Parity,
    fsync_file,
    sha256_file,
    temp_path_beside,
)
from engines.onnx_runtime import OnnxRuntimeEngine
from training.checkpoint import load_state
from training.models import build_backbone
from training.models.layers import FaceBackbone

OPSET = 17
INPUT_NAME, EMBEDDING_NAME, STYLE_NAME = "input", "embedding", "style"
BACKBONE_MEAN = BACKBONE_STD = 127.5  # every faceset backbone reads (p − 127.5)/127.5, RGB
DEFAULT_TEMPLATE = "arcface_112"
PARITY_MIN_COSINE = 0.9999
PARITY_MAX_NORM_REL_DIFF = 1e-3
PARITY_RANDOM_FACES = 8
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class ParityError(RuntimeError):
    """An exported graph does not compute what its torch module computes."""


# ---------------------------------------------------------------- checkpoints


@dataclass
class LoadedBackbone:
    model: FaceBackbone  # eval mode, float32, CPU
    arch: str
    embedding_size: int
    input_size: int
    path: Path
    card_defaults: dict = field(default_factory=dict)  # what the checkpoint says about the card


@dataclass(frozen=True)
class CheckpointFormat:
    """A backbone checkpoint layout: the key of its state dict and what it tells the card."""

    state_key: str
    build_kwargs: Callable[[dict], dict]
    card_defaults: Callable[[dict, Path], dict]



def _trainer_kwargs(ck: dict) -> dict:
    # a factory's `weights` would load starting weights the state dict is about to replace
    return {k: v for k, v in (ck.get("kwargs") or {}).items() if k != "weights"}


def training_template(config: dict) -> str | None:
    """The template the training crops were aligned with: align_tool's _align.json in the data folder, if found."""
    from training.data.align_tool import SETTINGS_NAME
    from training.settings import get_settings

    data = (config or {}).get("data") or {}
    if not data.get("root"):
        return None
    folder = Path(data["root"])
    if not folder.is_absolute():
        folder = get_settings().base_dir(data.get("base", "data")) / folder
    settings = folder / SETTINGS_NAME
    return json.loads(settings.read_text()).get("template") if settings.is_file() else None


def _trainer_card(ck: dict, path: Path) -> dict:
    config = ck.get("config") or {}
    run = f" of training run {config['name']!r}" if config.get("name") else ""
    step = f" at step {ck['step']}" if "step" in ck else ""
    card: dict = {"input": {"template": training_template(config) or DEFAULT_TEMPLATE},
                  "provenance": {"source": f"{path.name}: faceset backbone{run}{step}"}}
    magnitude = magnitude_from_config(config)
    if magnitude:
        card["magnitude"] = magnitude
        # until measured on real faces, the training range: MagFace's margin is linear on [l_a, u_a]
        card["quality"] = {"method": "magface_linear", "low": magnitude["l_a"], "high": magnitude["u_a"]}
    if config:
        data, model = config.get("data", {}), config.get("model", {})
        card["training"] = {
            "data": f"{data.get('root')} ({data.get('kind')} dataset under {data.get('base', 'data')}, "
                    f"{data.get('size')} px)",
            "recipe": f"faceset train {config.get('name')}",
            "notes": f"starting weights: {model['init']}" if model.get("init") else None,
        }
    return card


def _dlib_card(ck: dict, path: Path) -> dict:
    source = ck.get("source") or {}
    card = {
        "input": {"template": "dlib_150"},
        "provenance": {
            "source": f"{source.get('file', '?')} from {source.get('package', '?')}, by {source.get('author', '?')}; "
                      f"converted to {path.name} by training.convert.dlib_resnet",
            "notes": f"sha256 of the .dat: {source.get('sha256', '?')}; dlib aligns with {ck.get('alignment', '?')}",
        },
    }
    if "license" in source:  # otherwise the caller must state it: the card refuses to go without a licence
        card["licence"] = source["license"]
    return card


# name -> layout; a checkpoint is read by the one whose state_key it has
CHECKPOINT_FORMATS: dict[str, CheckpointFormat] = {
    "faceset_backbone": CheckpointFormat("backbone", _trainer_kwargs, _trainer_card),
    "dlib_converted": CheckpointFormat("state_dict", lambda ck: {}, _dlib_card),
}


def magnitude_from_config(config: dict) -> dict | None:
    """{l_a, u_a} when the training loss is magnitude-aware (its factory takes l_a and u_a), else None."""
    from training.losses import LOSSES

    loss = config.get("loss") or {}
    if loss.get("name") not in LOSSES:
        return None
    params = inspect.signature(LOSSES.get(loss["name"])).parameters
    if not {"l_a", "u_a"} <= params.keys():
        return None
    kwargs = loss.get("kwargs") or {}
    return {key: float(kwargs.get(key, params[key].default)) for key in ("l_a", "u_a")}


def _square_side(size) -> int:
    sides = {int(s) for s in (size if isinstance(size, (list, tuple)) else [size])}
    if len(sides) != 1:
        raise ValueError(f"only square inputs are supported, the checkpoint says {size}")
    return sides.pop()


def load_backbone(path: str | Path) -> LoadedBackbone:
    """The backbone of a faceset backbone.pt or a converted dlib checkpoint, in eval mode."""
    path = Path(path)
    ck = load_state(path)
    fmt = next((f for f in CHECKPOINT_FORMATS.values() if f.state_key in ck), None)
    if fmt is None:
        keys = " or ".join(f.state_key for f in CHECKPOINT_FORMATS.values())
        raise ValueError(f"{path}: not a backbone checkpoint (no {keys} key; found {sorted(ck)})")
    model = build_backbone(ck["arch"], embedding_size=ck["embedding_size"], **fmt.build_kwargs(ck))
    model.load_state_dict(ck[fmt.state_key], strict=True)
    model = model.float().eval()
    size = _square_side(ck.get("input_size", model.input_size))
    return LoadedBackbone(model, ck["arch"], int(ck["embedding_size"]), size, path, fmt.card_defaults(ck, path))


# ---------------------------------------------------------------- the exported module


def style_statistics(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """CAFace's style input: per-channel mean and std of each (B, C_i, h, w) map -> (B, 2·Σ C_i).

    For every channel, mean and standard deviation over the h·w positions (std with the n − 1
    divisor, torch.std's default, as the official CAFace code computes it), interleaved
    (mean_1, std_1, mean_2, std_2, …), maps concatenated shallowest first.
    """
    stats = []
    for fmap in maps:
        if not torch.jit.is_tracing() and fmap.shape[2] * fmap.shape[3] < 2:
            raise ValueError(f"a {tuple(fmap.shape)} map has one position: its standard deviation is undefined")
        flat = fmap.flatten(2)  # (B, C, h·w)
        stats.append(torch.stack([flat.mean(dim=2), flat.std(dim=2)], dim=2))  # (B, C, 2)
    return torch.cat(stats, dim=1).flatten(1)  # (B, ΣC, 2) -> (B, 2·ΣC)


class ExportModule(nn.Module):
    """Card-preprocessed input -> the backbone's raw embedding (and style statistics).

    The card's x_k = (p_k − mean_k)/std_k (k in the card's channel order) becomes the backbone's
    y_c = (p_c − 127.5)/127.5 (c in RGB) as y_c = x_k·std_k/127.5 + (mean_k − 127.5)/127.5 with
    k = c for RGB and k = 2 − c for BGR. With the card's defaults that is the identity and the
    graph is the bare backbone.
    """

    def __init__(self, backbone: FaceBackbone, channel_order: str, mean: Sequence[float], std: Sequence[float],
                 style: bool = False) -> None:
        super().__init__()
        self.backbone, self.style = backbone, style
        self.order = [2, 1, 0] if channel_order == "BGR" else [0, 1, 2]  # card channel read for R, G, B
        mean_rgb = torch.tensor([float(mean[k]) for k in self.order])
        std_rgb = torch.tensor([float(std[k]) for k in self.order])
        self.register_buffer("scale", (std_rgb / BACKBONE_STD).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", ((mean_rgb - BACKBONE_MEAN) / BACKBONE_STD).view(1, 3, 1, 1), persistent=False)
        self.identity = self.order == [0, 1, 2] and bool((self.scale == 1).all() and (self.shift == 0).all())

    def to_backbone_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.identity:
            return x
        return x[:, self.order] * self.scale + self.shift  # (B, 3, S, S), RGB, (p − 127.5)/127.5

    def forward(self, x: torch.Tensor):
        y = self.to_backbone_input(x)
        if not self.style:
            return self.backbone(y)
        # backbone(y) recomputes the intermediates; the exporter's common-subexpression pass merges
        # the two identical chains, so the graph runs the backbone once (a test counts the convs)
        return self.backbone(y), style_statistics(self.backbone.forward_intermediates(y))


def export_traced(module: nn.Module, example: tuple, path: Path, inputs: Sequence[str], outputs: Sequence[str],
                  dynamic_axes: dict, opset: int = OPSET) -> None:
    """torch.onnx.export (TorchScript exporter: the dynamo one needs onnxscript), checked, fsynced.

    Shape-dependent Python (dlib's zero-padded add) is traced as constants: valid for the fixed
    sizes of the example; the dynamic axes are checked by the caller's parity run at other sizes.
    """
    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export")
        torch.onnx.export(module, example, str(path), input_names=list(inputs), output_names=list(outputs),
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    onnx.checker.check_model(str(path))
    fsync_file(path)


def export_graph(module: ExportModule, size: int, path: Path, opset: int = OPSET) -> None:
    """The backbone graph, with a dynamic batch axis."""
    outputs = [EMBEDDING_NAME] + ([STYLE_NAME] if module.style else [])
    export_traced(module, (torch.zeros(2, 3, size, size),), path, [INPUT_NAME], outputs,
                  {name: {0: "batch"} for name in [INPUT_NAME, *outputs]}, opset)


@contextlib.contextmanager
def staged_files(out_dir: Path, names: Sequence[str]) -> Iterator[list[Path]]:
    """Temp paths for out_dir/NAME, moved into place only when the block (export, then parity) finishes.

    When the block raises, the temps are deleted and an out_dir made here is removed again:
    nothing of a failed export stays behind.
    """
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    finals = [out_dir / name for name in names]
    tmps = [temp_path_beside(final) for final in finals]
    try:
        yield tmps
    except BaseException:  # cleaning up, then re-raised
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        if created:
            with contextlib.suppress(OSError):  # only an empty folder is removed
                out_dir.rmdir()
        raise
    for tmp, final in zip(tmps, finals):
        os.replace(tmp, final)


# ---------------------------------------------------------------- parity


def _rowwise_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-300)


def torch_reference(backbone: FaceBackbone, faces: np.ndarray, style: bool = False):
    """The backbone on aligned uint8 RGB faces (N, S, S, 3), scaled (p − 127.5)/127.5 in float64 then float32."""
    y = (faces.astype(np.float64) - BACKBONE_MEAN) / BACKBONE_STD
    y = torch.from_numpy(np.ascontiguousarray(y.transpose(0, 3, 1, 2)).astype(np.float32))  # (N, 3, S, S)
    with torch.no_grad():
        embedding = backbone(y).numpy()
        style_stats = style_statistics(backbone.forward_intermediates(y)).numpy() if style else None
    return embedding, style_stats


def check_parity(backbone: FaceBackbone, card: ModelCard, faces: np.ndarray, inputs: str,
                 intra_op_threads: int = 1) -> Parity:
    """Compare the card's ONNX (ONNX Runtime, CPU) with the torch backbone on `faces`; ParityError if they differ.

    The ONNX runs on the whole set in one batch and on the first face alone, so a graph that
    only works at the batch size it was traced with (2) fails here.
    """
    engine = OnnxRuntimeEngine(card, providers=["CPUExecutionProvider"], intra_op_threads=intra_op_threads,
                               max_batch_size=max(len(faces), 1))
    style = card.outputs.style is not None
    expected, expected_style = torch_reference(backbone, faces, style)
    x = preprocess(faces, card)
    out = engine.run(x)  # {"embedding": (N, D), "style": (N, S) where the card has it}
    got, got_style = out["embedding"], out.get("style")
    alone = engine.embed(x[:1])  # (1, D)
    norm_expected = np.linalg.norm(expected.astype(np.float64), axis=1)
    norm_rel = np.abs(np.linalg.norm(got.astype(np.float64), axis=1) - norm_expected) / np.maximum(norm_expected, 1e-12)
    cosines = np.concatenate([_rowwise_cosine(expected, got), _rowwise_cosine(expected[:1], alone)])
    parity = Parity(
        reference=f"torch {torch.__version__} fp32", runtime=f"onnxruntime {ort.__version__} {engine.providers[0]}",
        inputs=inputs, images=len(faces), min_cosine=float(cosines.min()), max_norm_rel_diff=float(norm_rel.max()),
        style_min_cosine=float(_rowwise_cosine(expected_style, got_style).min()) if style else None,
    )
    worst = min(parity.min_cosine, parity.style_min_cosine if style else 1.0)
    # written so that NaN (a graph producing garbage) fails: every comparison with NaN is False
    if not (worst >= PARITY_MIN_COSINE and parity.max_norm_rel_diff <= PARITY_MAX_NORM_REL_DIFF):
        raise ParityError(f"{card.onnx_path.name}: ONNX Runtime vs torch on {parity.images} faces ({inputs}): "
                          f"min cosine {parity.min_cosine:.6f}, style {parity.style_min_cosine}, max magnitude "
                          f"difference {parity.max_norm_rel_diff:.2e}; need cosine ≥ {PARITY_MIN_COSINE} and "
                          f"magnitude within {PARITY_MAX_NORM_REL_DIFF:.0e}")
    return parity


def random_faces(size: int, count: int = PARITY_RANDOM_FACES, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(count, size, size, 3), dtype=np.uint8)


# ---------------------------------------------------------------- the card


def card_data(loaded: LoadedBackbone, name: str, version: str, style_channels: list[int] | None,
              overrides: dict, opset: int) -> dict:
    """The card as a dict, before the ONNX exists: the checkpoint's facts, then the caller's overrides."""
    if "files" in overrides or "parity" in overrides:
        raise ValueError("files and parity are written by the export, not overridden")
    base = {
        "name": name,
        "version": str(version),
        "architecture": loaded.arch,
        "files": {"onnx": {"path": f"{name}.onnx", "sha256": "0" * 64}},  # filled in once the ONNX exists
        "input": {"size": loaded.input_size, "template": DEFAULT_TEMPLATE, "channel_order": "RGB",
                  "mean": [BACKBONE_MEAN] * 3, "std": [BACKBONE_STD] * 3, "layout": "NCHW"},
        "outputs": {"embedding": EMBEDDING_NAME, "style": STYLE_NAME if style_channels else None,
                    "style_channels": style_channels},
        "embedding_size": loaded.embedding_size,
        "flip_tta": False,
        "provenance": {"exporter": f"torch {torch.__version__} (TorchScript exporter), opset {opset}, "
                                   f"onnx {onnx.__version__}",
                       "source_sha256": sha256_file(loaded.path)},
    }
    return deep_merge(deep_merge(base, loaded.card_defaults), overrides)


def _style_channels(backbone: FaceBackbone, size: int) -> list[int]:
    with torch.no_grad():
        maps = backbone.forward_intermediates(torch.zeros(2, 3, size, size))
    style_statistics(maps)  # refuses maps with a single position before any export work
    return [int(m.shape[1]) for m in maps]


# ---------------------------------------------------------------- export


def export_onnx(
    backbone_pt: str | Path | LoadedBackbone,
    out_dir: str | Path,
    name: str,
    version: str,
    card_overrides: dict | None = None,
    parity_images: Sequence[np.ndarray] | np.ndarray | None = None,
    opset: int = OPSET,
    style_outputs: bool = False,
    command: str | None = None,
) -> ModelCard:
    """backbone.pt -> out_dir/{name}.onnx + out_dir/card.yaml, after the parity check; returns the card.

    backbone_pt: a checkpoint path, or what `load_backbone` made of one.

    card_overrides: nested card fields that replace the defaults (licence, training, input.template,
        quality, calibration, accuracy …); `files` and `parity` are the export's own.
    parity_images: aligned uint8 RGB faces of the model's input size ((N, S, S, 3) or a list of
        (S, S, 3)); random pixels when None (a weaker check: say so in the card).
    style_outputs: add the "style" output (see `style_statistics`).
    command: the command line recorded as provenance.command.
    """
    loaded = backbone_pt if isinstance(backbone_pt, LoadedBackbone) else load_backbone(backbone_pt)
    size = loaded.input_size
    style_channels = _style_channels(loaded.model, size) if style_outputs else None
    data = card_data(loaded, name, version, style_channels, card_overrides or {}, opset)
    if command:
        data["provenance"]["command"] = command
    ModelCard.model_validate(data)  # a bad override fails here, before any file is written
    faces, inputs = _parity_faces(parity_images, size)

    out_dir = Path(out_dir)
    with staged_files(out_dir, [f"{name}.onnx"]) as (tmp,):
        module = ExportModule(loaded.model, data["input"]["channel_order"], data["input"]["mean"],
                              data["input"]["std"], style=style_outputs).eval()
        export_graph(module, size, tmp, opset)
        data["files"]["onnx"] = {"path": tmp.name, "sha256": sha256_file(tmp)}
        card = ModelCard.model_validate(data).set_root(out_dir)
        card.parity = check_parity(loaded.model, card, faces, inputs)
    card.files.onnx.path = f"{name}.onnx"
    card.save(out_dir / CARD_FILENAME)
    return card


def _parity_faces(images, size: int) -> tuple[np.ndarray, str]:
    if images is None or len(images) == 0:
        return random_faces(size), "random uint8 pixels (no faces given)"
    faces = np.stack(list(images)) if not isinstance(images, np.ndarray) else images
    if faces.dtype != np.uint8 or faces.ndim != 4 or faces.shape[1:] != (size, size, 3):
        raise ValueError(f"parity faces must be uint8 (N, {size}, {size}, 3) RGB, got {faces.dtype} {faces.shape}")
    return faces, "real aligned faces"


# ---------------------------------------------------------------- official MagFace checkpoints

# MagFace's inference code (IrvingMeng/MagFace inference/gen_feat.py) reads faces with cv2.imread
# (BGR) and applies ToTensor + Normalize(mean 0, std 1): the network sees p/255 in BGR. Every BN of
# its iResNet has eps 2e-5 (ours 1e-5). Its MS1MV2 models were trained with l_a 10, u_a 110.
MAGFACE_INPUT = {"template": DEFAULT_TEMPLATE, "channel_order": "BGR", "mean": [0.0, 0.0, 0.0],
                 "std": [255.0, 255.0, 255.0]}
MAGFACE_BN_EPS = 2e-5
MAGFACE_RANGE = {"l_a": 10.0, "u_a": 110.0}


class MagFaceInput(nn.Module):
    """A MagFace-trained backbone behind faceset's backbone input convention.

    faceset backbones read y_c = (p_c − 127.5)/127.5 in RGB; MagFace's read m_c = p_k/255 with
    k = 2 − c (BGR), so m_c = (127.5·y_{2−c} + 127.5)/255 = 0.5·y_{2−c} + 0.5. With the card stating
    MagFace's own scaling, the export's card-to-backbone conversion and this one cancel: the ONNX
    takes exactly what MagFace's code feeds its network.
    """

    def __init__(self, backbone: FaceBackbone) -> None:
        super().__init__()
        self.backbone = backbone
        self.embedding_size, self.input_size = backbone.embedding_size, backbone.input_size

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.backbone(y[:, [2, 1, 0]] * 0.5 + 0.5)  # (B, 3, S, S): RGB (p − 127.5)/127.5 -> BGR p/255


def load_magface_backbone(pth: str | Path, arch: str, embedding_size: int = 512) -> LoadedBackbone:
    """An official MagFace iResNet checkpoint ({"state_dict": {"features.module.…": …, "fc.weight": …}, …}).

    The backbone's weights are loaded strictly (the classifier `fc.weight` of MagFace's head is
    left out), every BN gets MagFace's eps, and the model is wrapped in `MagFaceInput`.
    """
    from training.models.iresnet import load_insightface_state_dict

    path = Path(pth)
    ck = load_state(path)  # weights only: a downloaded file runs no code
    backbone = build_backbone(arch, embedding_size=embedding_size)
    dropped = load_insightface_state_dict(backbone, ck)
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eps = MAGFACE_BN_EPS
    card = {
        "input": dict(MAGFACE_INPUT),
        "magnitude": dict(MAGFACE_RANGE),
        # until measured on real faces, the training range: MagFace's margin is linear on [l_a, u_a]
        "quality": {"method": "magface_linear", "low": MAGFACE_RANGE["l_a"], "high": MAGFACE_RANGE["u_a"]},
        "provenance": {"source": f"{path.name}: official MagFace checkpoint (IrvingMeng/MagFace), {arch}",
                       "notes": f"loaded with training.models.iresnet (BN eps set to {MAGFACE_BN_EPS}); "
                                f"{len(dropped)} keys outside the backbone left out: {', '.join(dropped[:4])}"},
    }
    return LoadedBackbone(MagFaceInput(backbone).eval(), arch, embedding_size, backbone.input_size, path, card)


def export_magface_checkpoint(
    pth: str | Path,
    arch: str,
    out_dir: str | Path,
    name: str,
    licence: str,
    version: str = "1",
    embedding_size: int = 512,
    card_overrides: dict | None = None,
    parity_images: Sequence[np.ndarray] | np.ndarray | None = None,
    command: str | None = None,
) -> ModelCard:
    """An official MagFace .pth -> out_dir/{name}.onnx + card.yaml (MagFace's BGR p/255 input), via `export_onnx`.

    licence: the weights' terms (MagFace's released models are trained on MS1MV2: research use).
    """
    loaded = load_magface_backbone(pth, arch, embedding_size)
    overrides = deep_merge({"licence": licence}, card_overrides or {})
    return export_onnx(loaded, out_dir, name, version, overrides, parity_images, command=command)


def read_faces(folder: str | Path, size: int, limit: int = 32) -> np.ndarray:
    """Up to `limit` images of a folder (sorted by name) as RGB uint8, resized to size×size if they are not.

    Parity needs realistic pixel statistics, not exact alignment, so a resize is harmless here.
    """
    paths = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]
    if not paths:
        raise FileNotFoundError(f"no images in {folder}")
    faces = []
    for path in paths:
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        if bgr is None:
            raise ValueError(f"cannot read image {path}")
        if bgr.shape[:2] != (size, size):
            bgr = cv2.resize(bgr, (size, size), interpolation=cv2.INTER_AREA)
        faces.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    return np.stack(faces)  # (N, S, S, 3)


def card_overrides(card_yaml: Path | None = None, template: str | None = None, licence: str | None = None,
                   data_licence: str | None = None) -> dict:
    """Card fields to set: a YAML of them, then the template, the weights' and the data's licences on top."""
    import yaml

    overrides = yaml.safe_load(card_yaml.read_text()) if card_yaml else {}
    if template:
        overrides = deep_merge(overrides, {"input": {"template": template}})
    if licence:
        overrides["licence"] = licence
    if data_licence:
        overrides = deep_merge(overrides, {"training": {"licence": data_licence}})
    return overrides
