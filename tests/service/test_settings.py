"""The one settings class: environment variables, secure defaults outside development."""
from __future__ import annotations

from pathlib import Path
from typing import get_args

import pytest
from pydantic import ValidationError

from service.app import RUNTIME_OPTIONS
from service.settings import ServingRuntime, Settings


def test_every_setting_reads_from_the_environment(monkeypatch):
    monkeypatch.setenv("FACESET_MAX_BATCH_SIZE", "7")
    monkeypatch.setenv("FACESET_API_KEYS", '["k1", "k2"]')
    monkeypatch.setenv("FACESET_REDIS_URL", "redis://:secret@example:6379/3")
    monkeypatch.setenv("FACESET_LOG_LEVEL", "warning")
    s = Settings()
    assert s.max_batch_size == 7 and [k.get_secret_value() for k in s.api_keys] == ["k1", "k2"]
    assert "secret" not in repr(s) and "k1" not in repr(s)  # secrets are never printed
    assert s.redis_url.get_secret_value().endswith("/3") and s.log_level_number == 30


def test_production_refuses_to_start_without_api_keys(monkeypatch):
    monkeypatch.setenv("FACESET_ENVIRONMENT", "production")
    with pytest.raises(ValidationError, match="FACESET_API_KEYS"):
        Settings()
    monkeypatch.setenv("FACESET_API_KEYS", '["k"]')
    assert Settings().environment == "production"


def test_bad_values_name_the_setting(tmp_path):
    with pytest.raises(ValidationError, match="model_card"):
        Settings(model_card=tmp_path / "missing")
    with pytest.raises(ValidationError, match="max_batch_size"):
        Settings(max_batch_size=0)
    with pytest.raises(ValidationError, match="api_keys"):
        Settings(api_keys=[""])


def test_every_served_runtime_takes_its_options_from_the_settings():
    assert set(RUNTIME_OPTIONS) == set(get_args(ServingRuntime))  # build_pipeline looks the engine setting up


def test_state_lives_in_the_users_state_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert Settings().state_dir == tmp_path / "faceset"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert Settings().state_dir == Path.home() / ".local" / "state" / "faceset"
