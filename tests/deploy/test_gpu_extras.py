"""The GPU extras resolve from PyPI into one consistent stack (issue 16): pip's dry-run report of the GPU
environment (constraints/gpu_stack.py), with the files of every wheel read from PyPI's zip directories.

Network: one `pip install --dry-run --report` (PEP 658 metadata only, no wheel is downloaded; ~20-35 s
here) and, on a cold cache, HTTP range reads of each wheel's zip directory (0.3 MB for the 50 wheels,
~6 s), cached by wheel file name under .cache/gpu-extras/.
"""
from __future__ import annotations

import importlib.metadata

import pytest
from packaging.requirements import Requirement

from constraints import gpu_stack
from engines.tensorrt_engine import TENSORRT_MAJOR

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report() -> dict:
    return gpu_stack.resolve(gpu_stack.gpu_requirements(), constraints=gpu_stack.CONSTRAINTS)


@pytest.fixture(scope="module")
def files(report) -> dict[str, list[str]]:
    return gpu_stack.report_files(report)


def _extra(name: str) -> list[Requirement]:
    return [Requirement(r) for r in gpu_stack.pyproject()["optional-dependencies"][name]]


def test_constraints_gpu_txt_pins_exactly_the_resolved_gpu_environment(report):
    lines = [line for line in gpu_stack.CONSTRAINTS.read_text().splitlines() if line and not line.startswith("#")]
    assert sorted(lines) == sorted(gpu_stack.pins(report))  # complete (nothing resolved unpinned) and nothing stale


def test_the_gpu_environment_replaces_the_cpu_runtimes_instead_of_adding_to_them(report):
    names = set(gpu_stack.installs(report))
    assert {"onnxruntime-gpu", "faiss-gpu", "cuda-python"} <= names
    assert not names & set(gpu_stack.REPLACED)  # no onnxruntime, no faiss-cpu


def test_no_two_packages_of_the_gpu_environment_write_the_same_module(files):
    assert gpu_stack.clashes(files) == {}


def test_the_base_cpu_runtimes_beside_the_gpu_stack_would_clash(files):
    """Why the GPU install is not `pip install '.[gpu]'`: the base's packages (as installed in this venv)
    write the same files as their GPU replacements; the check finds exactly those two modules."""
    cpu = {name: [str(p) for p in importlib.metadata.files(name) if ".dist-info" not in str(p)]
           for name in gpu_stack.REPLACED}
    found = gpu_stack.clashes({**files, **cpu})
    assert found == {"faiss": {"faiss-cpu", "faiss-gpu"}, "onnxruntime": {"onnxruntime", "onnxruntime-gpu"}}


def test_the_gpu_environment_is_built_for_one_cuda_major(report):
    majors = gpu_stack.cuda_majors(report)
    assert {"onnxruntime-gpu", "faiss-gpu", "cuda-python", "cuda-bindings", "nvidia-cuda-runtime-cu12"} <= set(majors)
    assert set(majors.values()) == {12}, majors


def test_the_tensorrt_extra_pins_the_major_the_engine_targets_on_the_same_cuda():
    """Statically on the extra's pins, then by resolving the Python bindings alone under the same specifier
    (tensorrt-cu12-libs is an sdist whose build fetches the libraries from NVIDIA's index: it cannot resolve here)."""
    (trt,) = [r for r in _extra("tensorrt") if r.name.startswith("tensorrt")]
    assert gpu_stack.cuda_major(trt.name, "0") == 12
    assert f"{TENSORRT_MAJOR}.0.1" in trt.specifier and f"{TENSORRT_MAJOR}.99" in trt.specifier
    assert f"{TENSORRT_MAJOR + 1}.0" not in trt.specifier and f"{TENSORRT_MAJOR - 1}.99" not in trt.specifier
    cuda_python = {str(r) for r in _extra("tensorrt") if r.name == "cuda-python"}
    assert cuda_python and cuda_python == {str(r) for r in _extra("gpu") if r.name == "cuda-python"}
    bindings = gpu_stack.installs(gpu_stack.resolve([f"{trt.name}-bindings{trt.specifier}"]))
    version = bindings[f"{trt.name}-bindings"]["version"]
    assert int(version.split(".")[0]) == TENSORRT_MAJOR
