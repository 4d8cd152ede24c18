"""Docker from the tests: the engine, a clean tree to build from, the images, containers that clean up."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import uuid
from pathlib import Path
from typing import Iterator

import httpx

REPO = Path(__file__).resolve().parents[2]
# What the images are built from: the tracked files under these paths, nothing else of the checkout
CONTEXT = ("pyproject.toml", "README.md", "service", "engines", "models", "constraints", "docker", "tests/deploy")
BASE = "faceset-base:bookworm"  # docker/local-base.sh; reused across runs
CPU_IMAGE, REDIS_IMAGE = "faceset-test:cpu", "faceset-test-redis:bookworm"
# Debian's docker.io has no buildx plugin: the classic builder, which every Docker engine still has
ENV = {**os.environ, "DOCKER_BUILDKIT": "0"}


def docker(*args: str, timeout: float = 120, check: bool = True, **kw) -> subprocess.CompletedProcess:
    done = subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout, env=ENV, **kw)
    if check:
        assert done.returncode == 0, f"docker {' '.join(args[:3])}: {done.stderr[-3000:]}"
    return done


def engine_missing() -> str | None:
    """Why no Docker engine answers here, or None."""
    if shutil.which("docker") is None:
        return "no Docker engine: the docker command is not installed (.ci/run installs docker.io)"
    done = subprocess.run(["docker", "info", "--format", "{{.ServerVersion}}"], capture_output=True, text=True,
                          timeout=30)
    return None if done.returncode == 0 else f"no Docker engine answers: {done.stderr.strip()[-300:]}"


def clean_tree(dest: Path) -> Path:
    """CONTEXT as committed at HEAD (git archive): no venv, no untracked file, no one's uncommitted edit."""
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD", "--", *CONTEXT], cwd=REPO,
                             capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest


def build(tree: Path, dockerfile: str, tag: str, *args: str, timeout: float = 1200) -> None:
    docker("build", "-q", "-f", dockerfile, "--build-arg", f"BASE={BASE}", "-t", tag, *args, str(tree),
           timeout=timeout)


def wait_ready(url: str, container: str, timeout_s: float = 180) -> dict:
    """/readyz's body once it answers 200 (the container's log in the failure otherwise)."""
    deadline, last = time.monotonic() + timeout_s, "no answer"
    while time.monotonic() < deadline and _running(container):
        with contextlib.suppress(httpx.HTTPError):
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200:
                return r.json()
            last = r.text
        time.sleep(1)
    logs = docker("logs", "--tail", "40", container, check=False)
    raise AssertionError(f"{url} not ready within {timeout_s} s: {last}\n{logs.stdout}{logs.stderr}")


def _running(container: str) -> bool:
    return docker("inspect", "--format", "{{.State.Running}}", container).stdout.strip() == "true"


def published(container: str, port: int = 8000) -> str:
    """host:port that the container's port is published on (first binding)."""
    return docker("port", container, f"{port}/tcp").stdout.split()[0]


@contextlib.contextmanager
def network() -> Iterator[str]:
    name = f"faceset-test-{uuid.uuid4().hex[:8]}"
    docker("network", "create", name)
    try:
        yield name
    finally:
        docker("network", "rm", name, check=False)


@contextlib.contextmanager
def container(*args: str) -> Iterator[str]:
    """`docker run -d ARGS`, removed with its anonymous volumes on the way out."""
    cid = docker("run", "-d", *args).stdout.strip()
    try:
        yield cid
    finally:
        docker("rm", "-f", "-v", cid, check=False)
