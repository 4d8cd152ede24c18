"""The one engine interface: a batch of preprocessed faces in, named raw outputs out.

Every runtime (ONNX Runtime, TensorRT, torch) implements `Engine` and registers in ENGINES; the
batcher and the routes see only this interface. An engine returns a dict of outputs, one row per
face: "embedding" always, "style" (CAFace style statistics) where the model and runtime have it;
`Engine.outputs` declares which, with each row's width. Around it:
  preprocess   aligned uint8 RGB faces -> the network's float32 input, as the model card says
  with_tta     the network input under the card's flip test-time augmentation
  merge_tta    the one place TTA views are combined, for every output
  run_aligned  preprocess, run, merge: the one path from aligned faces to per-face outputs, so
               every caller treats a model the same way (`embed_aligned`: its embeddings alone)
Embeddings stay raw (not normalised): their norms are the MagFace magnitudes, i.e. the quality.

Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from engines.model_card import ModelCard
from engines.registry import Registry

log = logging.getLogger(__name__)

ENGINES: Registry = Registry("engine")

# Runtime name -> the module that registers it. Only the requested runtime's module is imported,
# so choosing "onnxruntime" never loads torch or TensorRT. A new runtime adds a line here.
RUNTIME_MODULES: dict[str, str] = {
    "onnxruntime": "engines.onnx_runtime",
    "torch": "engines.torch_engine",
    "tensorrt": "engines.tensorrt_engine",
}

EMBEDDING, STYLE = "embedding", "style"


class EngineInputError(ValueError):
    """A batch the engine cannot take (wrong shape, dtype or size)."""


@runtime_checkable
class Engine(Protocol):
    """What every runtime provides.

    name: identifies the engine instance in logs and metrics (runtime and model).
    max_batch_size: the most faces one inference runs; `run` takes any N and splits it.
    input_size: side S of the square input.
    embedding_size: D.
    outputs: the names `run` returns -> the width of their rows, e.g. {"embedding": D, "style": S}.
    """

    name: str
    max_batch_size: int
    input_size: int
    embedding_size: int
    outputs: dict[str, int]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        """(N, 3, S, S) float32, already preprocessed -> {name: (N, width) float32} for every declared output."""
        ...

    def health(self) -> bool:
        """Runs a tiny inference; False (never an exception) when the engine cannot serve."""
        ...


def card_outputs(card: ModelCard) -> dict[str, int]:
    """The outputs of the card's graph -> their widths: what a runtime running the whole graph returns."""
    outputs = {EMBEDDING: card.embedding_size}
    if card.outputs.style is not None:
        outputs[STYLE] = 2 * sum(card.outputs.style_channels)
    return outputs


def graph_outputs(card: ModelCard) -> dict[str, str]:
    """The outputs of the card's graph -> the graph's own names for them."""
    names = {EMBEDDING: card.outputs.embedding}
    if card.outputs.style is not None:
        names[STYLE] = card.outputs.style
    return names


class ChunkedEngine(ABC):
    """Card loading, input checks, chunking to max_batch_size and the health check, shared by the runtimes.

    A runtime calls `_use_card`, sets max_batch_size and implements `_infer` for one chunk of at
    most max_batch_size faces.
    """

    runtime: str
    card: ModelCard
    name: str
    max_batch_size: int
    input_size: int
    embedding_size: int
    outputs: dict[str, int]

    def _use_card(self, card: ModelCard | str | Path, verify: bool, names: tuple[str, ...] | None = None) -> None:
        """Load the card (a ModelCard, a card.yaml or its folder; verify: check its files' sha256) and take the
        engine's name, sizes and declared outputs from it (names: the outputs this runtime returns, default all)."""
        if not isinstance(card, ModelCard):
            card = ModelCard.load(card, verify=verify)
        elif verify:
            card.verify_files()
        self.card = card
        self.name = f"{self.runtime}:{card.name}:{card.version}"
        self.input_size, self.embedding_size = card.input.size, card.embedding_size
        self.outputs = {name: width for name, width in card_outputs(card).items() if names is None or name in names}

    @abstractmethod
    def _infer(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        """(n ≤ max_batch_size, 3, S, S) float32 -> {name: (n, width) float32} for every declared output."""

    def check_batch(self, batch: np.ndarray) -> np.ndarray:
        """The batch as contiguous float32 (N, 3, S, S), or EngineInputError saying what is wrong."""
        if not isinstance(batch, np.ndarray) or batch.dtype != np.float32:
            raise EngineInputError(f"{self.name}: expected a float32 numpy array, got "
                                   f"{getattr(batch, 'dtype', type(batch).__name__)}")
        s = self.input_size
        if batch.ndim != 4 or batch.shape[1:] != (3, s, s):
            raise EngineInputError(f"{self.name}: expected shape (N, 3, {s}, {s}), got {batch.shape}")
        return np.ascontiguousarray(batch)

    def chunks(self, batch: np.ndarray) -> list[np.ndarray]:
        step = self.max_batch_size
        return [batch[i : i + step] for i in range(0, len(batch), step)]

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        batch = self.check_batch(batch)
        parts = [self._checked(chunk, self._infer(chunk)) for chunk in self.chunks(batch)]
        return {name: np.concatenate([p[name] for p in parts]) if parts else np.zeros((0, width), np.float32)
                for name, width in self.outputs.items()}  # {name: (N, width)}

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """`run(batch)["embedding"]`: (N, D) raw embeddings, for callers that want nothing else."""
        return self.run(batch)[EMBEDDING]

    def _checked(self, chunk: np.ndarray, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        for name, width in self.outputs.items():
            got = out[name].shape if name in out else "nothing"
            if got != (len(chunk), width):
                raise RuntimeError(f"{self.name}: output {name!r} is {got}, expected ({len(chunk)}, {width})")
        return out

    def health(self) -> bool:
        probe = np.zeros((1, 3, self.input_size, self.input_size), dtype=np.float32)
        try:
            out = self.run(probe)
        except Exception:  # health reports, never raises: whatever the runtime throws means "cannot serve"
            log.exception("%s: health check inference failed", self.name)
            return False
        return all(bool(np.isfinite(rows).all()) for rows in out.values())


def build_engine(runtime: str, **kwargs) -> Engine:
    """An engine of the named runtime ("onnxruntime", …), e.g. build_engine("onnxruntime", card=path)."""
    module = RUNTIME_MODULES.get(runtime)
    if module is None:
        raise KeyError(f"unknown engine runtime {runtime!r}; known: {', '.join(sorted(RUNTIME_MODULES))}")
    importlib.import_module(module)  # registers the runtime in ENGINES
    return ENGINES.build(runtime, **kwargs)


# ---- from aligned faces ------------------------------------------------------------------


def preprocess(faces: np.ndarray, card: ModelCard) -> np.ndarray:
    """Aligned faces (N, S, S, 3) uint8 RGB -> the network input (N, 3, S, S) float32.

    x[n, c, i, j] = (p[n, i, j, k_c] − mean_c) / std_c with k = (0, 1, 2) for an RGB network and
    (2, 1, 0) for a BGR one; mean and std are listed in the network's channel order.
    """
    s = card.input.size
    if not isinstance(faces, np.ndarray) or faces.dtype != np.uint8:
        raise EngineInputError(f"expected uint8 aligned faces, got {getattr(faces, 'dtype', type(faces).__name__)}")
    if faces.ndim != 4 or faces.shape[1:] != (s, s, 3):
        raise EngineInputError(f"expected aligned faces of shape (N, {s}, {s}, 3), got {faces.shape}")
    if card.input.channel_order == "BGR":
        faces = faces[..., ::-1]
    mean = np.asarray(card.input.mean, dtype=np.float32)
    std = np.asarray(card.input.std, dtype=np.float32)
    x = (faces.astype(np.float32) - mean) / std  # (N, S, S, 3), broadcast over the channel axis
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # (N, 3, S, S)


def with_tta(x: np.ndarray, card: ModelCard) -> np.ndarray:
    """The network input for `x` (N, 3, S, S) under the card's TTA: (2N, …), faces then their mirror images."""
    return np.concatenate([x, x[..., ::-1]]) if card.flip_tta else x


# How the two views of a face combine, per output. The embedding is the sum f(x) + f(mirror x),
# not the mean: MagFace magnitudes and the card's quality range are measured on the sum. The style
# is the mean (σ(x) + σ(mirror x))/2: the embedding is made of both views, so its style describes
# both, and it stays symmetric (the mirrored face gives the same frame).
_MERGE_VIEWS = {
    EMBEDDING: lambda a, b: a + b,
    STYLE: lambda a, b: (a + b) / 2,
}


def merge_tta(outputs: dict[str, np.ndarray], card: ModelCard) -> dict[str, np.ndarray]:
    """Per-face outputs {name: (N, width)} from the outputs of `with_tta`'s input {name: (2N, width) or (N, width)}."""
    if not card.flip_tta:
        return dict(outputs)
    unknown = set(outputs) - set(_MERGE_VIEWS)
    if unknown:
        raise ValueError(f"no flip-TTA rule for output(s) {sorted(unknown)}")
    n = len(next(iter(outputs.values()))) // 2
    return {name: _MERGE_VIEWS[name](rows[:n], rows[n:]) for name, rows in outputs.items()}


def run_aligned(engine: Engine, card: ModelCard, faces: np.ndarray) -> dict[str, np.ndarray]:
    """Every output of the engine for aligned uint8 RGB faces (N, S, S, 3), with the card's flip TTA."""
    return merge_tta(engine.run(with_tta(preprocess(faces, card), card)), card)


def embed_aligned(engine: Engine, card: ModelCard, faces: np.ndarray) -> np.ndarray:
    """Raw embeddings (N, D) of aligned uint8 RGB faces (N, S, S, 3), with the card's flip TTA."""
    return run_aligned(engine, card, faces)[EMBEDDING]
