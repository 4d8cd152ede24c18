"""The Docker images of tests/deploy/test_containers.py: built once per run from HEAD's tree, cached by Docker."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy.containers import BASE, CPU_IMAGE, REDIS_IMAGE, REPO, build, clean_tree, engine_missing


@pytest.fixture(scope="session")
def engine() -> None:
    reason = engine_missing()
    if reason:
        pytest.skip(reason)


@pytest.fixture(scope="session")
def tree(engine, tmp_path_factory) -> Path:
    return clean_tree(tmp_path_factory.mktemp("tree"))


@pytest.fixture(scope="session")
def base_image(tree) -> str:
    """The local Debian base (debootstrap, ~2 min the first time; reused while it exists)."""
    done = subprocess.run([str(tree / "docker" / "local-base.sh"), BASE], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return BASE


@pytest.fixture(scope="session")
def cpu_image(tree, base_image) -> str:
    revision = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    build(tree, "docker/Dockerfile", CPU_IMAGE, "--build-arg", f"REVISION={revision}")
    return CPU_IMAGE


@pytest.fixture(scope="session")
def redis_image(tree, base_image) -> str:
    """A Redis image (Debian's redis-server as uid 999) standing in for the official one compose names."""
    build(tree, "tests/deploy/redis.Dockerfile", REDIS_IMAGE)
    return REDIS_IMAGE
