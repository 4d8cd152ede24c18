"""Checkpoints round-trip through the one loader, which loads weights only."""
from __future__ import annotations

import pickle
from fractions import Fraction

import pytest
import torch

from training.checkpoint import (
    atomic_torch_save,
    latest_checkpoint,
    load_checkpoint,
    load_state,
    save_checkpoint,
)


def test_a_checkpoint_round_trips(tmp_path):
    replicated = {"backbone": {"w": torch.arange(6.0).view(2, 3)}, "step": 7, "lr": 0.1, "name": "smoke",
                  "classes": ["a", "b"], "crop": (0.1, 0.2, 0.9, 1.0), "init": None, "rng": torch.get_rng_state()}
    shard = {"head": {"weight": torch.ones(2, 4)}, "optimizer": {"state": {}, "param_groups": [{"lr": 0.1}]}}
    path = save_checkpoint(tmp_path, 7, replicated, shard)
    assert latest_checkpoint(tmp_path) == path
    got, got_shard = load_checkpoint(path)
    assert got.keys() == replicated.keys() and got["crop"] == (0.1, 0.2, 0.9, 1.0)
    assert torch.equal(got["backbone"]["w"], replicated["backbone"]["w"]) and torch.equal(got["rng"], replicated["rng"])
    assert {k: v for k, v in got.items() if k not in ("backbone", "rng")} == {
        k: v for k, v in replicated.items() if k not in ("backbone", "rng")}
    assert torch.equal(got_shard["head"]["weight"], shard["head"]["weight"])
    assert got_shard["optimizer"] == shard["optimizer"]


def test_a_checkpoint_without_shards_loads_none(tmp_path):
    path = save_checkpoint(tmp_path, 3, {"step": 3})
    assert load_checkpoint(path) == ({"step": 3}, None) and not list(path.glob("shard-*"))


def test_a_pickled_object_is_refused(tmp_path):
    atomic_torch_save({"step": 1, "schedule": Fraction(1, 3)}, tmp_path / "model.pt")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_state(tmp_path / "model.pt")
