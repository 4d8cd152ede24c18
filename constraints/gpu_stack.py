"""The GPU environment faceset declares, resolved by pip without installing anything.

    python constraints/gpu_stack.py            # print the pins of a fresh resolution
    python constraints/gpu_stack.py --write    # rewrite constraints/gpu.txt with them (atomically)

The GPU environment is the base install with its CPU-only runtimes (`REPLACED`) swapped for the
`gpu` extra: pip extras only add, so `pip install '.[gpu]'` would put onnxruntime beside
onnxruntime-gpu and faiss-cpu beside faiss-gpu (each pair writes the same module). The README's GPU
install is therefore `pip install --no-deps .` plus `pip install -r constraints/gpu.txt`.

Also the checks tests/deploy/test_gpu_extras.py runs on a resolution: which files each resolved wheel
would install (read from the wheel's zip directory with HTTP range requests, a few KiB per wheel,
cached under .cache/gpu-extras/), which modules two wheels would both write, and the CUDA major
each package is built for.
"""
from __future__ import annotations

import io
import json
import re
import subprocess
import sys
import tempfile
import tomllib
import urllib.request
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints" / "gpu.txt"
CACHE = REPO / ".cache" / "gpu-extras"
# base requirement -> the gpu extra's package that provides the same module
REPLACED = {"onnxruntime": "onnxruntime-gpu", "faiss-cpu": "faiss-gpu"}
HEADER = """\
# The GPU environment (CUDA 12), every package pinned: the base install's requirements with onnxruntime and
# faiss-cpu replaced by pyproject.toml's `gpu` extra, resolved by `python constraints/gpu_stack.py --write`
# (pip install --dry-run --report, Python {python}, manylinux x86-64). Install (README, "GPU"):
#     pip install --no-deps . && pip install -r constraints/gpu.txt
# TensorRT (the `tensorrt` extra) is not in here: its libraries come from NVIDIA's index, not PyPI.
"""


def _name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def pyproject(path: Path = REPO / "pyproject.toml") -> dict:
    return tomllib.loads(path.read_text())["project"]


def gpu_requirements(project: dict | None = None) -> list[str]:
    """The base requirements less the CPU-only runtimes, plus the `gpu` extra."""
    project = project or pyproject()
    base = [r for r in project["dependencies"] if _name(r) not in REPLACED]
    return base + project["optional-dependencies"]["gpu"]


def resolve(requirements: list[str], constraints: Path | None = None) -> dict:
    """pip's installation report for `requirements` in an empty environment (nothing is installed)."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                   "--report", str(report), *requirements]
        if constraints is not None:
            command += ["-c", str(constraints)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            raise RuntimeError(f"pip could not resolve {requirements}:\n{done.stderr[-3000:]}")
        return json.loads(report.read_text())


def installs(report: dict) -> dict[str, dict]:
    """name -> {version, url, requires} of every package the report would install."""
    return {_name(i["metadata"]["name"]): {"version": i["metadata"]["version"], "url": i["download_info"]["url"],
                                           "requires": i["metadata"].get("requires_dist") or []}
            for i in report["install"]}


def pins(report: dict) -> list[str]:
    return [f"{name}=={p['version']}" for name, p in sorted(installs(report).items())]


# ---- CUDA majors -----------------------------------------------------------------------------
CUDA_SUFFIX = re.compile(r"-cu(\d+)(?:-|$)")
# packages versioned by the CUDA release they are built from (the unsuffixed nvidia-* of CUDA 13 too)
CUDA_VERSIONED = re.compile(r"^(cuda-python|cuda-bindings|nvidia-cuda-runtime|nvidia-cuda-nvrtc|nvidia-cublas|"
                            r"nvidia-nvjitlink|nvidia-cuda-cupti|nvidia-cuda-toolkit|cuda-toolkit)$")


def cuda_major(name: str, version: str, requires: list[str] = ()) -> int | None:
    """The CUDA major a package is built for: its -cuNN suffix, its version where it follows CUDA's, or
    the CUDA runtime it requires; None for a package tied to no CUDA."""
    if match := CUDA_SUFFIX.search(name):
        return int(match.group(1)[:2])  # cu118 -> 11, cu12 -> 12
    if CUDA_VERSIONED.match(name):
        return int(version.split(".")[0])
    for requirement in requires:  # extras too: onnxruntime-gpu names its CUDA runtime only in [cuda]
        if (major := _required_cuda(requirement)) is not None:
            return major
    return None


def _required_cuda(requirement: str) -> int | None:
    name = _name(requirement)
    if match := CUDA_SUFFIX.search(name):
        return int(match.group(1)[:2])
    if name == "nvidia-cuda-runtime" and (bound := re.search(r"(?:~=|>=|==)\s*(\d+)", requirement)):
        return int(bound.group(1))
    return None


def cuda_majors(report: dict) -> dict[str, int]:
    """name -> CUDA major, for every package of the report built for one."""
    return {name: major for name, p in installs(report).items()
            if (major := cuda_major(name, p["version"], p["requires"])) is not None}


# ---- which files a wheel installs ------------------------------------------------------------
class _RangeReader(io.RawIOBase):
    """A remote file read with HTTP range requests: zipfile reads only the end record and the directory."""

    def __init__(self, url: str) -> None:
        self.url, self.pos = url, 0
        with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=60) as r:
            self.size = int(r.headers["Content-Length"])

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.pos = {0: 0, 1: self.pos, 2: self.size}[whence] + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        end = self.size if n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.pos}-{end - 1}"})
        with urllib.request.urlopen(request, timeout=60) as r:
            data = r.read()
        self.pos += len(data)
        return data


def wheel_files(url: str, cache: Path = CACHE) -> list[str]:
    """Paths a wheel installs into site-packages (its .data/purelib|platlib folded in, dist-info left out)."""
    cached = cache / (re.sub(r"[^A-Za-z0-9._-]", "_", url.rsplit("/", 1)[-1]) + ".json")
    if cached.is_file():  # wheel file names are unique on the index and their files never change
        return json.loads(cached.read_text())
    if url.startswith("file://"):
        names = zipfile.ZipFile(url[len("file://"):]).namelist()
    else:
        names = zipfile.ZipFile(_RangeReader(url)).namelist()
    files = sorted({re.sub(r"^[^/]+\.data/(purelib|platlib)/", "", n) for n in names
                    if not n.endswith("/") and not re.match(r"^[^/]+\.dist-info/", n)
                    and not re.match(r"^[^/]+\.data/(?!purelib/|platlib/)", n)})
    cache.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(files))
    return files


def report_files(report: dict, cache: Path = CACHE) -> dict[str, list[str]]:
    """name -> the files each wheel of the report installs (wheels read in parallel)."""
    packages = installs(report)
    with ThreadPoolExecutor(8) as pool:
        return dict(zip(packages, pool.map(lambda p: wheel_files(p["url"], cache), packages.values())))


def clashes(files: dict[str, list[str]]) -> dict[str, set[str]]:
    """Top-level module -> the packages that would write the same file in it (one overwriting the other).
    An empty `X/__init__.py` shipped by every part of a namespace package (nvidia/) is not a clash."""
    owners: dict[str, set[str]] = {}
    for name, paths in files.items():
        for path in paths:
            if not re.fullmatch(r"[^/]+/__init__\.py", path):
                owners.setdefault(path, set()).add(name)
    found: dict[str, set[str]] = {}
    for path, names in owners.items():
        if len(names) > 1:
            found.setdefault(path.split("/")[0].removesuffix(".py"), set()).update(names)
    return found


def main(argv: list[str]) -> int:
    report = resolve(gpu_requirements())
    lines = pins(report)
    if "--write" in argv:
        from engines.atomic import atomic_write

        python = ".".join(map(str, sys.version_info[:2]))
        text = HEADER.format(python=python) + "\n".join(lines) + "\n"
        atomic_write(CONSTRAINTS, lambda f: f.write(text.encode()))
    else:
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main(sys.argv[1:]))
