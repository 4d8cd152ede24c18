"""The service process never imports torch (ROADMAP): building the whole pipeline loads none of it."""
from __future__ import annotations

import subprocess
import sys

CODE = """
import sys
from service.app import build_pipeline, create_app
from service.settings import Settings
settings = Settings()
create_app(settings)
build_pipeline(settings)
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
print("ok")
"""


def test_service_does_not_import_torch():
    done = subprocess.run([sys.executable, "-c", CODE], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]
