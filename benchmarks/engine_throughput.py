"""Engine throughput: faces/s and latency by batch size for every available runtime, the fraction of
the machine's measured matmul rate reached, and the dynamic batcher under concurrent clients.

    python benchmarks/engine_throughput.py [--card models/default] [--checkpoint runs/.../backbone.pt] [--seconds 5]

All figures come from this one run (ratios are only meaningful within a run). Prints tables.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import platform
import time
from pathlib import Path

import numpy as np

from engines.base import build_engine
from engines.batcher import DynamicBatcher
from engines.model_card import ModelCard


def matmul_gflops(seconds: float = 2.0, n: int = 1024) -> float:
    """The machine's measured float32 matmul rate (numpy/BLAS), the compute roof the engines are compared to."""
    a, b = np.random.rand(n, n).astype(np.float32), np.random.rand(n, n).astype(np.float32)
    a @ b
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e9


def onnx_gflop_per_face(card: ModelCard) -> float:
    """Multiply-accumulates of Conv/Gemm/MatMul nodes at batch 1, ×2 = FLOP, from the graph's shapes."""
    import onnx
    from onnx import shape_inference

    model = onnx.load(str(card.onnx_path))
    s = card.input.size
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = shape_inference.infer_shapes(model)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in list(model.graph.value_info) + list(model.graph.output)}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    macs = 0
    for node in model.graph.node:
        if node.op_type == "Conv" and node.output[0] in shapes and node.input[1] in inits:
            out = shapes[node.output[0]]  # (1, C_out, H, W)
            w = inits[node.input[1]]  # (C_out, C_in/groups, kh, kw)
            macs += int(np.prod(out)) * int(np.prod(w[1:]))
        elif node.op_type in ("Gemm", "MatMul") and node.input[1] in inits:
            macs += int(np.prod(inits[node.input[1]]))
    del s
    return 2 * macs / 1e9


def faces_per_second(engine, size: int, batch: int, seconds: float) -> tuple[float, float]:
    """(faces/s, mean latency per batch in ms) embedding random faces of one batch size."""
    x = np.random.rand(batch, 3, size, size).astype(np.float32)
    engine.embed(x)  # warm-up
    t0, n, lat = time.perf_counter(), 0, []
    while time.perf_counter() - t0 < seconds:
        t = time.perf_counter()
        engine.embed(x)
        lat.append(time.perf_counter() - t)
        n += batch
    return n / (time.perf_counter() - t0), 1000 * float(np.mean(lat))


async def _clients(batcher: DynamicBatcher, size: int, clients: int, seconds: float) -> float:
    face = np.random.rand(1, 3, size, size).astype(np.float32)
    done = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            await batcher.run(face)
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return done / (time.perf_counter() - t0)


def batcher_faces_per_second(engine, size: int, clients: int, max_batch: int, delay_ms: float, seconds: float) -> float:
    async def run() -> float:
        batcher = DynamicBatcher(engine, max_batch_size=max_batch, max_delay_ms=delay_ms)
        await batcher.start()
        try:
            return await _clients(batcher, size, clients, seconds)
        finally:
            await batcher.stop()

    return asyncio.run(run())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--card", type=Path, default=Path("models/default"))
    ap.add_argument("--checkpoint", type=Path, default=None, help="torch checkpoint of the same model, for the torch runtime")
    ap.add_argument("--batches", default="1,4,8,16,32")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--batcher-delays", default="5,2", help="max queue delays (ms) to try for the batcher")
    args = ap.parse_args()
    card = ModelCard.load(args.card)
    size, batches = card.input.size, [int(b) for b in args.batches.split(",")]
    roof = matmul_gflops()
    gflop = onnx_gflop_per_face(card)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; measured fp32 matmul {roof:.1f} GFLOP/s")
    print(f"model: {card.name} {card.version}, {size}x{size}, {gflop:.3f} GFLOP per face (Conv/Gemm)\n")
    runtimes = {"onnxruntime": build_engine("onnxruntime", card=card, max_batch_size=max(batches))}
    if args.checkpoint:
        runtimes["torch"] = build_engine("torch", card=card, checkpoint=args.checkpoint, max_batch_size=max(batches))
    try:  # FP16 plan, built once and cached; only where TensorRT and a CUDA GPU are
        runtimes["tensorrt"] = build_engine("tensorrt", card=card, max_batch_size=max(batches))
    except (ImportError, RuntimeError) as exc:
        print(f"tensorrt: not run ({type(exc).__name__}: {exc})\n")
    best: dict[str, tuple[int, float]] = {}
    print(f"{'runtime':12s} {'batch':>5s} {'faces/s':>9s} {'ms/batch':>9s} {'% of matmul roof':>17s}")
    for name, engine in runtimes.items():
        for b in batches:
            fps, ms = faces_per_second(engine, size, b, args.seconds)
            print(f"{name:12s} {b:5d} {fps:9.1f} {ms:9.1f} {100 * fps * gflop / roof:16.1f}%")
            if fps > best.get(name, (0, 0.0))[1]:
                best[name] = (b, fps)
    if "torch" in best:
        print(f"\nonnxruntime / torch at their best batch: {best['onnxruntime'][1] / best['torch'][1]:.2f}x")
    b, fps = best["onnxruntime"]
    print(f"\nbatcher, {args.clients} concurrent single-face clients; engine's best {fps:.1f} faces/s (batch {b})")
    for max_batch in sorted({b, args.clients}):
        for delay in (float(d) for d in args.batcher_delays.split(",")):
            via = batcher_faces_per_second(runtimes["onnxruntime"], size, args.clients, max_batch, delay, args.seconds)
            print(f"  max batch {max_batch:3d}, max delay {delay:4.1f} ms: {via:7.1f} faces/s = {100 * via / fps:3.0f}% of the engine's best")


if __name__ == "__main__":
    main()
