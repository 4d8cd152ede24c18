"""The ONNX Runtime engine: a model card's ONNX, on CUDA where present, else on the CPU.

    engine = OnnxRuntimeEngine("models/recognition")          # a card.yaml or its folder
    raw = embed_aligned(engine, engine.card, faces_uint8)      # (N, D); norms are the magnitudes
    out = engine.run(x)                                        # {"embedding": (N, D), "style": (N, S)}

At load the graph's signature is checked against the card (one float input (N, 3, S, S) with
S = input.size, the card's outputs present, embedding of length D), so a mismatched card fails
at start-up. Batches larger than max_batch_size run in chunks; one session serves concurrent
callers (InferenceSession.run is thread-safe). The engine returns every output the card names
("style" where it has one), all from one session.run. Nothing here imports torch.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

import numpy as np
import onnxruntime as ort

from engines.base import ENGINES, ChunkedEngine, embed_aligned, graph_outputs, preprocess
from engines.model_card import ModelCard, ModelCardError

__all__ = ["OnnxRuntimeEngine", "default_providers", "embed_aligned", "preprocess"]

CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"


def default_providers() -> list[str]:
    """CUDA then CPU where this onnxruntime build has CUDA, else the CPU alone."""
    if CUDA not in ort.get_available_providers():
        return [CPU]
    _preload_cuda()
    return [CUDA, CPU]


@functools.cache
def _preload_cuda() -> None:
    """The GPU install's CUDA and cuDNN are nvidia-* wheels, not on the loader's path: without loading them
    first, the CUDA provider fails to load and sessions fall back to the CPU (ONNX Runtime ≥ 1.21)."""
    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()


@ENGINES.register("onnxruntime")
class OnnxRuntimeEngine(ChunkedEngine):
    """One InferenceSession over the card's ONNX.

    card: a ModelCard (attached to its folder), a card.yaml, or the folder holding one.
    providers: ONNX Runtime execution providers in priority order (default: `default_providers`).
    intra_op_threads: threads per inference; 0 lets ONNX Runtime use every core, 1 suits a server
        running several engines or requests side by side.
    max_batch_size: the most faces per inference: larger amortises overhead, costs memory and the
        latency of the whole batch. Capped at the graph's batch size when that is fixed.
    verify: check the card's sha256 of the ONNX before loading it.
    spin_wait: let ONNX Runtime's pool threads spin between inferences (its default: lowest latency
        when the engine has the cores to itself); False when other work shares the cores, as in the service.
    """

    runtime = "onnxruntime"

    def __init__(
        self,
        card: ModelCard | str | Path,
        providers: Sequence[str] | None = None,
        intra_op_threads: int = 0,
        max_batch_size: int = 64,
        verify: bool = True,
        spin_wait: bool = True,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        self._use_card(card, verify)
        card = self.card
        options = ort.SessionOptions()
        options.intra_op_num_threads = intra_op_threads
        if not spin_wait:  # idle pool threads sleep instead of spinning: fair to other work on the same cores
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(card.onnx_path), options,
                                            providers=list(providers or default_providers()))
        self.input_name, fixed_batch = self._check_signature()
        # a graph exported with a fixed batch takes exactly that many: chunks are padded up to it
        self.fixed_batch = fixed_batch
        self.max_batch_size = min(max_batch_size, fixed_batch) if fixed_batch else max_batch_size
        self.graph_outputs = graph_outputs(card)

    @property
    def providers(self) -> list[str]:
        """The providers the session actually runs on (a missing CUDA library falls back to the CPU)."""
        return self.session.get_providers()

    def _check_signature(self) -> tuple[str, int | None]:
        """The input's name and its fixed batch size (None when dynamic); ModelCardError on any mismatch."""
        inputs = self.session.get_inputs()
        where = f"{self.card.onnx_path}"
        if len(inputs) != 1:
            raise ModelCardError(f"{where}: expected one input, found {[i.name for i in inputs]}")
        (graph_input,) = inputs
        if graph_input.type != "tensor(float)":
            raise ModelCardError(f"{where}: input {graph_input.name!r} is {graph_input.type}, expected tensor(float)")
        shape, s = list(graph_input.shape), self.input_size
        # a side the graph leaves symbolic takes the card's size (faceset model import --input-size)
        if len(shape) != 4 or shape[1] != 3 or any(isinstance(d, int) and d != s for d in shape[2:]):
            raise ModelCardError(f"{where}: input shape {shape} does not match the card's (N, 3, {s}, {s})")
        outputs = {o.name: o for o in self.session.get_outputs()}
        for wanted in filter(None, (self.card.outputs.embedding, self.card.outputs.style)):
            if wanted not in outputs:
                raise ModelCardError(f"{where}: the card names output {wanted!r}; the graph has {sorted(outputs)}")
        width = outputs[self.card.outputs.embedding].shape[-1]
        if isinstance(width, int) and width != self.embedding_size:
            raise ModelCardError(f"{where}: embedding width {width} != the card's embedding_size {self.embedding_size}")
        return graph_input.name, shape[0] if isinstance(shape[0], int) else None

    def _infer(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        n = len(chunk)
        if self.fixed_batch and n < self.fixed_batch:
            pad = np.zeros((self.fixed_batch - n, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, pad])
        outs = self.session.run(list(self.graph_outputs.values()), {self.input_name: chunk})
        return {name: np.asarray(out[:n], dtype=np.float32) for name, out in zip(self.graph_outputs, outs)}
