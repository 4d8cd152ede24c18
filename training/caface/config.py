"""The fusion training config: YAML validated into pydantic models (unknown keys refused with their path).

Shipped configs live in training/configs/caface/ (not beside the backbone configs, which are all
`training.config.TrainConfig`s). `load_caface_config(name_or_path, overrides)` reads one; overrides
are "a.b=value" strings applied before validation, as in `training.config`.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from training.caface.model import FusionArch
from training.config import load_tree

CAFACE_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "caface"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureFiles(_Strict):
    train: str = Field(description="features .npz of the training tree (training.caface.features), under runs_dir.")
    holdout: str | None = Field(None, description="features .npz of the calibration hold-out (never trained on), "
                                "under runs_dir; read by evaluation only (null: none, e.g. faceset model fuse).")
    eval_every: int = Field(8, gt=1, description="every k-th multi-image CelebA-299 identity of the training tree is "
                            "kept out of fusion training, for evaluation with larger templates.")
    eval_protected: str | None = Field("celeba-299-dlib150", description="aligned folder (under the aligned dir) whose "
                                       "identities are the candidates for that; null: every identity with 2+ images.")


class SetConfig(_Strict):
    min_size: int = Field(2, ge=1)
    max_size: int = Field(16, ge=1)
    max_images: int = Field(32, ge=2, description="images of an identity a set is drawn from (a random subset).")
    exclude_variants: list[str] = Field(default_factory=list, description="poor-frame kinds never put in a training "
                                        "set (to measure generalisation to a degradation not trained on).")


class OptimConfig(_Strict):
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)


class CAFaceConfig(_Strict):
    name: str
    recognition_card: str = Field("models/default", description="the frozen recognition model's card (its quality "
                                  "range normalises magnitudes; its name, version and sha256 go into the fusion card).")
    magnitude_range: tuple[float, float] | None = Field(None, description="(low, high): magnitudes enter the network "
                                                        "as (‖f‖ − low)/(high − low); null: the recognition card's "
                                                        "quality range (a card without one needs it set).")
    features: FeatureFiles
    arch: FusionArch = Field(default_factory=FusionArch)
    sets: SetConfig = Field(default_factory=SetConfig)
    optim: OptimConfig = Field(default_factory=OptimConfig)
    steps: int = Field(3000, gt=0)
    batch_sets: int = Field(64, gt=0, description="sets per step.")
    seed: int = 0
    threads: int = Field(1, ge=1, description="torch threads.")
    log_every: int = Field(50, gt=0)
    checkpoint_every: int = Field(500, gt=0)


def caface_configs() -> list[Path]:
    return sorted(CAFACE_CONFIG_DIR.glob("*.yaml"))


def load_caface_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> CAFaceConfig:
    return CAFaceConfig(**load_tree(path, CAFACE_CONFIG_DIR, overrides))
