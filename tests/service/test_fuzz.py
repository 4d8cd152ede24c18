"""Schemathesis against the live service (issue 11): its CLI fuzzes every operation of /openapi.json
(examples, coverage, fuzzing), then runs the state machine over the document's links (create -> read
-> delete). No 5xx, every status documented, every response of its declared content type and schema.
Reproducible and bounded: a fixed seed, no example database, no cache, at most 25 examples per
operation and 10 steps per scenario."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from tests.helpers import drop_keys, live_server, make_settings

CONFIG = """
seed = 11
workers = 1
request-timeout = 10
[cache]
enabled = false
[generation]
max-examples = 25
database = "none"
[phases.stateful]
max-steps = 10
inference.algorithms = []  # the document's own links, nothing inferred
[checks]
enabled = false
not_a_server_error.enabled = true
status_code_conformance.enabled = true
content_type_conformance.enabled = true
response_schema_conformance.enabled = true
"""


@pytest.fixture(scope="module")
def base_url(redis_available):
    settings = make_settings()
    try:
        with live_server(settings) as (url, _):
            yield url
    finally:
        drop_keys(settings)


@pytest.mark.slow
def test_schemathesis_finds_nothing(base_url, tmp_path):
    (tmp_path / "schemathesis.toml").write_text(CONFIG)
    run = subprocess.run([sys.executable, "-m", "schemathesis.cli", "--config-file", "schemathesis.toml", "run",
                          f"{base_url}/openapi.json"], cwd=tmp_path, capture_output=True, text=True, timeout=170)
    report = run.stdout + run.stderr
    assert run.returncode == 0, report
    assert re.search(r"✅ Stateful", report), report
    covered = re.search(r"API Links:\s+(\d+) covered", report)
    assert covered and int(covered[1]) >= 2, report  # the state machine followed links, not only 404s
