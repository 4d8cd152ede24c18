"""The CI skip policy of tests/conftest.py, run on a small suite inside pytest."""
from __future__ import annotations

import pytest

SUITE = """
import pytest

def test_runs():
    pass

def test_needs_data():
    pytest.skip("real face data not found")

@pytest.mark.gpu
def test_marked_gpu():
    pytest.skip("tensorrt is not installed")

def test_no_device():
    pytest.skip("no GPU: no CUDA device")
"""


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest("from tests.conftest import pytest_sessionfinish, pytest_terminal_summary  # noqa: F401")
    pytester.makeini("[pytest]\nmarkers =\n    gpu: needs an NVIDIA GPU\n")
    return pytester


def test_ci_fails_on_a_skip_it_could_fix_and_names_only_that_one(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest_inprocess(suite.makepyfile(SUITE))
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.assert_outcomes(passed=1, skipped=3)
    result.stdout.fnmatch_lines(["*1 skips CI can fix*", "*::test_needs_data: real face data not found"])
    assert "test_marked_gpu:" not in result.stdout.str() and "test_no_device:" not in result.stdout.str()


def test_ci_passes_with_gpu_skips_only(suite, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest_inprocess(suite.makepyfile(SUITE.replace('"real face data not found"', '"no GPU here"')))
    assert result.ret == pytest.ExitCode.OK
    assert "skips CI can fix" not in result.stdout.str()


def test_outside_ci_a_skip_is_only_reported(suite, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest_inprocess(suite.makepyfile(SUITE), "-rs")
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["SKIPPED*real face data not found"])
