"""Training configs: YAML validated into dataclasses.

Unknown keys and wrong types are refused with the offending path. ``--set a.b=value`` overrides
are applied to the YAML tree before validation, so they are validated the same way.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field
from pydantic.dataclasses import dataclass

from training.data.transforms import AugmentConfig

_STRICT = ConfigDict(extra="forbid")
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


@dataclass(config=_STRICT)
class ModelConfig:
    backbone: str = "iresnet50"
    embedding_size: int = 512
    dropout: float = 0.0
    kwargs: dict[str, Any] = Field(default_factory=dict)
    init: str | None = None  # checkpoint (our backbone state dict) to start from; relative to runs_dir or absolute
    freeze_bn: bool = False  # keep BN statistics fixed (fine-tuning on small data)
    trainable: list[str] | None = None  # parameter-name prefixes to train; the rest stays frozen (None: all)


@dataclass(config=_STRICT)
class HeadConfig:
    name: str = "partial_fc"
    sample_rate: float = 1.0


@dataclass(config=_STRICT)
class LossConfig:
    name: str = "arcface"
    kwargs: dict[str, Any] = Field(default_factory=dict)


@dataclass(config=_STRICT)
class DataConfig:
    kind: Literal["folder", "recordio"] = "folder"
    root: str = "celeba-299"  # relative to the `base` folder unless absolute
    base: Literal["data", "aligned"] = "data"  # FACESET_DATA_DIR, or FACESET_ALIGNED_DIR (align_tool output)
    align_from: str | None = None  # raw photos under FACESET_DATA_DIR: detect + align them into `root` first (resumable)
    align_template: str = "arcface_112"
    align_pick: Literal["largest", "central"] = "largest"
    size: int = 112
    crop: tuple[float, float, float, float] | None = None  # fixed relative crop (l, t, r, b) before resizing
    min_images_per_class: int = 1
    max_classes: int | None = None
    exclude: list[str] = Field(default_factory=list)
    batch_size: int = 128  # per rank
    num_workers: int = 2
    augment: AugmentConfig = Field(default_factory=AugmentConfig)  # training/data/transforms.py


@dataclass(config=_STRICT)
class OptimConfig:
    name: Literal["sgd", "adamw"] = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    backbone_lr_mult: float = 1.0  # < 1 when fine-tuning a pretrained backbone
    head_warmup_steps: int = 0  # train only the classifier first, so a random head sends no noise into a pretrained backbone


@dataclass(config=_STRICT)
class ScheduleConfig:
    name: Literal["poly", "step", "cosine", "constant"] = "poly"
    warmup_epochs: float = 0.0
    power: float = 2.0
    milestones: list[float] = Field(default_factory=list)  # epochs, for "step"
    gamma: float = 0.1


@dataclass(config=_STRICT)
class EvalConfig:
    pairs: str | None = None  # LFW-style pairs file, relative to FACESET_DATA_DIR unless absolute
    images: str | None = None  # its images folder, relative to the `images_base` folder unless absolute
    images_base: Literal["data", "aligned"] = "data"
    images_align_from: str | None = None  # raw photos under FACESET_DATA_DIR to align into `images` first
    crop: tuple[float, float, float, float] | None = None
    every_epochs: int = 1
    n_folds: int = 10


@dataclass(config=_STRICT)
class TrainConfig:
    name: str
    model: ModelConfig = Field(default_factory=ModelConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    loss: LossConfig = Field(default_factory=LossConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    epochs: float = 20
    max_steps: int | None = None  # stop early (smoke runs, tests)
    seed: int = 0
    amp: bool = True  # only takes effect on CUDA
    sync_bn: bool = True  # global-batch BN statistics when data-parallel
    grad_clip: float | None = 5.0
    log_every: int = 10
    checkpoint_every: int = 500  # steps; a checkpoint is also written at every epoch end
    keep_checkpoints: int = 2


def _apply_override(tree: dict, dotted: str) -> None:
    key, sep, raw = dotted.partition("=")
    if not sep:
        raise ValueError(f"override {dotted!r} must look like a.b=value")
    *parents, leaf = key.strip().split(".")
    node = tree
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(raw)


def load_tree(path: str | Path, config_dir: Path, overrides: list[str] | tuple[str, ...] = ()) -> dict:
    """A YAML config's tree (a path, or the name of a config shipped in `config_dir`), overrides applied,
    `name` defaulting to the file's stem."""
    path = Path(path)
    if not path.is_file() and (config_dir / f"{path}.yaml").is_file():
        path = config_dir / f"{path}.yaml"
    tree = yaml.safe_load(path.read_text()) or {}
    for o in overrides:
        _apply_override(tree, o)
    tree.setdefault("name", path.stem)
    return tree


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Read a YAML config (a path, or the name of a shipped config) and validate it."""
    return TrainConfig(**load_tree(path, CONFIG_DIR, overrides))


def shipped_configs() -> list[Path]:
    return sorted(CONFIG_DIR.glob("*.yaml"))
