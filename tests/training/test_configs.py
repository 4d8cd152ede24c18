"""Every shipped config validates, and names a registered backbone, head, loss and dataset whose
constructors accept its arguments."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from training.config import load_config, shipped_configs
from training.data import DATASETS
from training.heads import HEADS
from training.losses import LOSSES, build_loss
from training.models import BACKBONES, build_backbone

CONFIGS = shipped_configs()


def test_configs_are_shipped():
    names = {p.stem for p in CONFIGS}
    assert {"smoke", "celeba-mbf-magface"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_config_builds(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    assert cfg.data.kind in DATASETS and cfg.head.name in HEADS and cfg.loss.name in LOSSES
    build_loss(cfg.loss.name, cfg.loss.kwargs, num_classes=10, embedding_size=cfg.model.embedding_size)
    HEADS.build(cfg.head.name, embedding_size=cfg.model.embedding_size, num_classes=10, sample_rate=cfg.head.sample_rate)
    with torch.device("meta"):  # shapes only: IResNet-100 is not allocated
        model = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size, dropout=cfg.model.dropout, **cfg.model.kwargs)
    assert model.embedding_size == cfg.model.embedding_size
    assert cfg.model.backbone in BACKBONES


def _only_error(exc: ValidationError) -> tuple[tuple, str]:
    (error,) = exc.errors()
    return error["loc"], error["type"]


def test_unknown_key_is_refused_with_its_path():
    with pytest.raises(ValidationError, match=r"optim\.lrr\n  Unexpected keyword argument") as caught:
        load_config("smoke", ["optim.lrr=0.1"])
    assert _only_error(caught.value) == (("optim", "lrr"), "unexpected_keyword_argument")


def test_override_is_validated():
    assert load_config("smoke", ["optim.lr=0.01"]).optim.lr == 0.01
    with pytest.raises(ValidationError, match=r"optim\.lr\n  Input should be a valid number") as caught:
        load_config("smoke", ["optim.lr=fast"])
    assert _only_error(caught.value) == (("optim", "lr"), "float_parsing")


def test_a_shipped_name_wins_over_a_folder_of_the_same_name(tmp_path, monkeypatch):
    (tmp_path / "smoke").mkdir()  # e.g. a run directory left in the working directory
    monkeypatch.chdir(tmp_path)
    assert load_config("smoke").name == "smoke"
