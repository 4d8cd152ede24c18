"""`faceset serve`, the README's first command, as a user runs it: defaults, its own Redis, clean shutdown."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.helpers import free_port

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server is not installed")]


def test_serve_starts_with_defaults_and_stops_cleanly(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESET_")} | {"FACESET_STATE_DIR": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, ready = time.monotonic() + 60, None
        while time.monotonic() < deadline and ready is None and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2)
            except httpx.HTTPError:
                time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, proc.stdout.read() if proc.poll() is not None else ""
        assert ready.json()["checks"]["redis"]["ok"] and (tmp_path / "redis" / "redis.sock").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode == 0, out
    assert "self-test" in out and "Application shutdown complete" in out
    assert subprocess.run(["pgrep", "-f", str(tmp_path / "redis" / "redis.sock")], check=False, capture_output=True).returncode == 1
