"""The GPU proof (issue 16): one run on the first lent GPU, well inside 10 minutes, printing tables.

    python benchmarks/gpu_check.py [--out runs/gpu_check] [--seconds 2] [--models default,iresnet50,iresnet100]

1. install: the GPU packages found (versions, the CUDA major each is built for), any two installed
   distributions writing the same module (onnxruntime beside onnxruntime-gpu, faiss-cpu beside
   faiss-gpu), ONNX Runtime's providers, the GPUs the CUDA driver reports.
2. ONNX Runtime's CUDA execution provider on an FP16 copy (float32 inputs and outputs kept) of the
   default model and of IResNet-50/100 exported by faceset-train (random weights, BatchNorm statistics
   set on random faces so activations stay in FP16's range): cosine to CPU ONNX Runtime's float32
   embeddings, each face ≥ 0.999.
3. faces/s by batch for each, and the fraction of the GPU's FP16 matrix rate that is (torch, 8192³ FP16
   products, CUDA events); the TensorRT engine's FP16 plan of the default model too where tensorrt is here.
4. the gallery on faiss-gpu against faiss-cpu on the same vectors, exact scan and approximate index,
   after removals and re-enrolments too: identical top-10 for every query.
5. a two-process NCCL DDP step (training.trainer.process_group_options) where two GPUs are present.

Exit status: 0 every check passed; 1 a check failed (its row says which); 3 no GPU here: the install
table is printed, then "no GPU: <why>", and nothing is measured. Results also go to OUT/gpu_check.json.
"""
from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.metadata as md
import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NO_GPU = 3
BATCHES = (1, 8, 32, 128, 256)
PARITY_FACES = 64
GPU_PACKAGES = ("onnxruntime-gpu", "onnxruntime", "faiss-gpu", "faiss-gpu-cu12", "faiss-cpu", "cuda-python",
                "cuda-bindings", "tensorrt", "tensorrt-cu12", "tensorrt-cu12-bindings", "torch", "numpy", "onnx")


def table(title: str, header: list[str], rows: list[list]) -> None:
    print(f"\n## {title}\n")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(f"{c:.4g}" if isinstance(c, float) else str(c) for c in row) + " |")


# ---- 1. install --------------------------------------------------------------------------------
def installed() -> dict[str, str]:
    found = {}
    for name in GPU_PACKAGES:
        try:
            found[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return found


def module_clashes() -> dict[str, set[str]]:
    """Installed distributions that write the same file (constraints/gpu_stack.clashes on their RECORDs)."""
    from constraints.gpu_stack import clashes

    files = {}
    for dist in md.distributions():
        name = dist.metadata["Name"].lower()
        files[name] = [str(p) for p in dist.files or [] if ".dist-info" not in str(p) and "__pycache__" not in str(p)]
    return clashes(files)


def cuda_majors() -> dict[str, int]:
    from constraints.gpu_stack import cuda_major

    majors = {}
    for dist in md.distributions():
        name = dist.metadata["Name"].lower().replace("_", "-")
        if major := cuda_major(name, dist.version, dist.requires or []):
            majors[name] = major
    return majors


def gpu_count() -> tuple[int, str]:
    """GPUs the CUDA driver reports (driver API through ctypes: no Python package needed)."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError as exc:
        return 0, f"no CUDA driver ({exc})"
    count = ctypes.c_int()
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0, "the CUDA driver reports no usable device"
    return count.value, f"{count.value} CUDA device(s)"


def install_check() -> dict:
    versions, clashes, majors = installed(), module_clashes(), cuda_majors()
    try:
        import onnxruntime as ort

        providers = ort.get_available_providers()
    except ImportError:
        providers = []
    try:
        import faiss

        faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError:
        faiss_gpus = 0
    table("installed", ["package", "version", "CUDA major"], [[n, v, majors.get(n, "")] for n, v in versions.items()])
    table("install checks", ["check", "value"], [
        ["modules written by two distributions", {m: sorted(d) for m, d in clashes.items()} or "none"],
        ["CUDA majors of the installed CUDA packages", sorted(set(majors.values())) or "none"],
        ["ONNX Runtime providers", ", ".join(providers)], ["faiss GPUs", faiss_gpus]])
    return {"versions": versions, "clashes": {m: sorted(d) for m, d in clashes.items()}, "cuda_majors": majors,
            "providers": providers, "faiss_gpus": faiss_gpus,
            "ok": not clashes and len(set(majors.values())) <= 1 and "CUDAExecutionProvider" in providers}


# ---- 2-3. the CUDA execution provider ----------------------------------------------------------
def export_iresnet(arch: str, out: Path, device: str) -> Path:
    """IResNet with random weights as faceset-train exports it; BatchNorm statistics set on random faces."""
    import torch

    from training.export import ExportModule, export_graph
    from training.models import build_backbone, settle_batchnorm

    torch.manual_seed(0)
    backbone = build_backbone(arch).to(device)
    settle_batchnorm(backbone, (torch.randn(32, 3, 112, 112, device=device) for _ in range(4)))
    backbone.eval().cpu()
    path = out / f"{arch}.onnx"
    export_graph(ExportModule(backbone, "RGB", [127.5] * 3, [127.5] * 3), 112, path)
    return path


def fp16_copy(path: Path, folder: Path) -> Path:
    """The same graph in FP16 (float32 inputs and outputs kept), with ONNX Runtime's own converter, written in
    `folder` (the run's work folder: never beside a shipped model)."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    out = folder / (path.stem + ".fp16.onnx")
    onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=True), str(out))
    return out


def model_inputs(name: str, out: Path, device: str) -> tuple[Path, np.ndarray]:
    """(fp32 ONNX, PARITY_FACES random faces preprocessed as its card says) for a model of --models."""
    rng = np.random.default_rng(0)
    if name == "default":
        from engines.model_card import ModelCard

        card = ModelCard.load(REPO / "models" / "default")
        pixels = rng.integers(0, 256, (PARITY_FACES, 3, card.input.size, card.input.size)).astype(np.float32)
        mean, std = (np.array(v, np.float32).reshape(1, 3, 1, 1) for v in (card.input.mean, card.input.std))
        return card.onnx_path, (pixels - mean) / std
    pixels = rng.integers(0, 256, (PARITY_FACES, 3, 112, 112)).astype(np.float32)
    return export_iresnet(name, out, device), (pixels - 127.5) / 127.5


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def faces_per_second(session, x: np.ndarray, batch: int, seconds: float) -> float:
    name = session.get_inputs()[0].name
    xb = np.ascontiguousarray(np.resize(x, (batch, *x.shape[1:])), np.float32)
    session.run(None, {name: xb})  # warm-up (cuDNN picks its algorithms per shape)
    t0, n = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        session.run(None, {name: xb})
        n += batch
    return n / (time.perf_counter() - t0)


def gflop_per_face(path: Path) -> float:
    from benchmarks.engine_throughput import onnx_gflop_per_face

    class Card:  # what onnx_gflop_per_face reads of a card
        onnx_path = path

        class input:
            size = 0

    return onnx_gflop_per_face(Card)


def fp16_matmul_tflops() -> float:
    """The GPU's measured FP16 matrix rate: 8192³ products, 3 warm-ups, 10 timed by CUDA events."""
    import torch

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.float16)
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 10 * 2 * 8192**3 / (start.elapsed_time(end) / 1000) / 1e12


def cuda_provider(models: list[str], out: Path, seconds: float, peak: float) -> dict:
    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):  # CUDA and cuDNN from the nvidia-* wheels (ONNX Runtime ≥ 1.21)
        ort.preload_dlls()
    results, parity_rows, speed_rows = {}, [], []
    for name in models:
        fp32, x = model_inputs(name, out, "cuda")
        fp16 = fp16_copy(fp32, out)
        cpu = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
        gpu = ort.InferenceSession(str(fp16), providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
        on = gpu.get_providers()[0]
        ref = cpu.run(None, {cpu.get_inputs()[0].name: x})[0]
        got = gpu.run(None, {gpu.get_inputs()[0].name: x})[0]
        cos = cosines(ref.reshape(len(x), -1), got.reshape(len(x), -1))
        ok = on == "CUDAExecutionProvider" and bool(np.isfinite(got).all()) and float(cos.min()) >= 0.999
        parity_rows.append([name, on, float(cos.min()), float(np.median(cos)), "ok" if ok else "FAIL"])
        gflop = gflop_per_face(fp32)
        rates = {b: faces_per_second(gpu, x, b, seconds) for b in BATCHES}
        speed_rows += [[name, b, r, r * gflop / 1e3 / peak] for b, r in rates.items()]
        results[name] = {"provider": on, "cos_min": float(cos.min()), "ok": ok, "gflop_per_face": gflop,
                         "faces_per_s": rates}
    table("CUDA EP, FP16 copy vs CPU ONNX Runtime float32", ["model", "provider", "cos min", "cos median", ""],
          parity_rows)
    table(f"faces/s (CUDA EP, FP16; GPU FP16 matmul {peak:.0f} TFLOP/s)", ["model", "batch", "faces/s",
                                                                           "fraction of FP16 matmul"], speed_rows)
    return results


def tensorrt(seconds: float, peak: float) -> dict:
    if importlib.util.find_spec("tensorrt") is None:
        print("\nTensorRT: not installed (its libraries come from NVIDIA's index): skipped")
        return {"skipped": "tensorrt not installed"}
    from engines.tensorrt_engine import TensorRTEngine

    engine = TensorRTEngine(REPO / "models" / "default", max_batch_size=max(BATCHES), fp16=True)
    size, rows = engine.input_size, []
    gflop = gflop_per_face(engine.card.onnx_path)
    for b in BATCHES:
        x = np.random.default_rng(0).standard_normal((b, 3, size, size)).astype(np.float32)
        engine.embed(x)
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            engine.embed(x)
            n += b
        rate = n / (time.perf_counter() - t0)
        rows.append(["default", b, rate, rate * gflop / 1e3 / peak])
    table("faces/s (TensorRT FP16 plan)", ["model", "batch", "faces/s", "fraction of FP16 matmul"], rows)
    return {"faces_per_s": {r[1]: r[2] for r in rows}}


# ---- 4. faiss-gpu gallery ------------------------------------------------------------------------
def gallery(n: int = 200_000, dim: int = 128, queries: int = 1000) -> dict:
    from service.gallery_index import GalleryIndex

    def change(entry, op, slot, identity, vector):  # a gallery_store.Change (whose module needs redis)
        return SimpleNamespace(entry=entry, op=op, slot=slot, identity=identity, vector=vector)

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    q = vectors[rng.choice(n, queries, replace=False)] + 0.3 * rng.standard_normal((queries, dim)).astype(np.float32)
    names = [f"id{i}" for i in range(n)]
    moved = rng.standard_normal((500, dim)).astype(np.float32)
    changes = [change(f"2-{i}", "del", s, None, None) for i, s in enumerate(range(0, 3000, 3))]
    changes += [change(f"3-{i}", "put", s, f"id{s}", v) for i, (s, v) in enumerate(zip(range(1, 1000, 2), moved))]
    rows, agree = [], {}
    for mode, exact_max in (("exact", n + 1), ("approximate", 1000)):
        tops = {}
        for device in ("cpu", "gpu"):
            idx = GalleryIndex(dim, exact_max, 0.25, device)
            idx.load("1-0", np.arange(n), names, vectors.copy())  # apply() changes the rows in place
            if mode == "approximate":
                idx.build()
            before = [[i for i, _ in r] for r in idx.search_now(q, 10)]
            idx.apply(changes)  # removals and re-enrolments through the uploaded copy
            t0 = time.perf_counter()
            after = [[i for i, _ in r] for r in idx.search_now(q, 10)]
            tops[device] = (before, after, queries / (time.perf_counter() - t0), idx.describe())
        same = [float(np.mean([a == b for a, b in zip(tops["cpu"][k], tops["gpu"][k])])) for k in (0, 1)]
        agree[mode] = same
        rows += [[mode, d, tops[d][3], tops[d][2]] for d in ("cpu", "gpu")]
        rows.append([mode, "identical top-10 (before / after changes)", f"{same[0]:.4f} / {same[1]:.4f}", ""])
    table(f"gallery: faiss-gpu vs faiss-cpu, {n} vectors, {queries} queries", ["index", "device", "", "searches/s"],
          rows)
    return {"agreement": agree, "ok": all(v == 1.0 for pair in agree.values() for v in pair)}


# ---- 5. DDP -----------------------------------------------------------------------------------------
def _ddp_worker(rank: int, world: int, port: int, queue) -> None:
    import torch
    import torch.distributed as tdist

    from training.models import build_backbone
    from training.trainer import process_group_options

    device = torch.device("cuda", rank)
    torch.cuda.set_device(device)  # before init_process_group, as training.trainer.init_distributed does
    tdist.init_process_group(**process_group_options(device, 300), init_method=f"tcp://127.0.0.1:{port}",
                             rank=rank, world_size=world)
    torch.manual_seed(rank)
    model = torch.nn.parallel.DistributedDataParallel(build_backbone("iresnet18").to(device), device_ids=[rank])
    loss = model(torch.randn(8, 3, 112, 112, device=device)).square().mean()
    loss.backward()
    grad = next(model.parameters()).grad.detach().clone()
    gathered = [torch.empty_like(grad) for _ in range(world)]
    tdist.all_gather(gathered, grad)
    queue.put(all(torch.equal(g, gathered[0]) for g in gathered))  # DDP averaged the gradients across ranks
    tdist.destroy_process_group()


def ddp() -> dict:
    import torch
    import torch.multiprocessing as mp

    if torch.cuda.device_count() < 2:
        print(f"\nDDP: {torch.cuda.device_count()} GPU here, two needed: skipped")
        return {"skipped": "one GPU"}
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_ddp_worker, args=(2, port, queue), nprocs=2, start_method="spawn")
    same = [queue.get() for _ in range(2)]
    table("DDP smoke step (NCCL, 2 GPUs)", ["check", "value"], [["gradients equal on both ranks", all(same)]])
    return {"ok": all(same)}


# ---------------------------------------------------------------------------------------------------------
def run(step, *args) -> dict:
    t0 = time.perf_counter()
    try:
        result = step(*args)
    except Exception as exc:  # one failing step is a FAIL row; the others still run
        traceback.print_exc()
        result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    result["seconds"] = round(time.perf_counter() - t0, 1)
    print(f"[{step.__name__}: {result['seconds']} s]")
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "gpu_check")
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per batch size")
    parser.add_argument("--models", default="default,iresnet50,iresnet100")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"install": run(install_check)}
    count, why = gpu_count()
    if count == 0:
        print(f"\nno GPU: {why}; nothing measured (exit {NO_GPU})")
        return NO_GPU
    try:  # the FP16 rate is torch's measurement: a machine without a CUDA torch gets no fractions
        import torch

        peak, name = fp16_matmul_tflops(), torch.cuda.get_device_name(0)
    except (ImportError, RuntimeError, AssertionError) as exc:
        peak, name = float("nan"), f"(no CUDA torch: {exc})"
    results["gpu"] = {"name": name, "count": count, "fp16_matmul_tflops": peak}
    print(f"\nGPU: {name} ×{count}; FP16 matmul {peak:.0f} TFLOP/s")
    results["cuda_provider"] = run(cuda_provider, args.models.split(","), args.out, args.seconds, peak)
    results["tensorrt"] = run(tensorrt, args.seconds, peak)
    results["gallery"] = run(gallery)
    results["ddp"] = run(ddp)
    (args.out / "gpu_check.json").write_text(json.dumps(results, indent=1, default=str))
    failed = [k for k, r in results.items() if r.get("ok") is False
              or any(isinstance(v, dict) and v.get("ok") is False for v in r.values())]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'all checks passed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "4")
    raise SystemExit(main())
