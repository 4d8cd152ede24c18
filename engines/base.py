"""The one engine interface: a batch of preprocessed faces in, raw embeddings out.

Every runtime (ONNX Runtime, TensorRT, torch) implements `Engine` and registers in ENGINES; the
batcher and the routes see only this interface. Around it:
  preprocess     aligned uint8 RGB faces -> the network's float32 input, as the model card says
  embed_aligned  preprocess, embed, and the card's flip test-time augmentation: the one path from
                 aligned faces to raw embeddings, so every caller treats a model the same way
Embeddings stay raw (not normalised): their norms are the MagFace magnitudes, i.e. the quality.

Nothing here imports torch.
"""
from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from typing import Protocol, runtime_checkable

import numpy as np

from engines.model_card import ModelCard, ModelCardError
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


class EngineInputError(ValueError):
    """A batch the engine cannot take (wrong shape, dtype or size)."""


@runtime_checkable
class Engine(Protocol):
    """What every runtime provides.

    name: identifies the engine instance in logs and metrics (runtime and model).
    max_batch_size: the most faces one inference runs; `embed` takes any N and splits it.
    input_size: side S of the square input.
    embedding_size: D.
    """

    name: str
    max_batch_size: int
    input_size: int
    embedding_size: int

    def embed(self, batch: np.ndarray) -> np.ndarray:
        """(N, 3, S, S) float32, already preprocessed -> (N, D) float32 raw embeddings."""
        ...

    def health(self) -> bool:
        """Runs a tiny inference; False (never an exception) when the engine cannot serve."""
        ...


class ChunkedEngine(ABC):
    """Input checks, chunking to max_batch_size and the health check, shared by the runtimes.

    A runtime sets the four attributes of `Engine` and implements `_infer` for one chunk of at
    most max_batch_size faces.
    """

    name: str
    max_batch_size: int
    input_size: int
    embedding_size: int

    @abstractmethod
    def _infer(self, chunk: np.ndarray) -> np.ndarray:
        """(n ≤ max_batch_size, 3, S, S) float32 -> (n, D) float32."""

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

    def embed(self, batch: np.ndarray) -> np.ndarray:
        batch = self.check_batch(batch)
        if not len(batch):
            return np.zeros((0, self.embedding_size), dtype=np.float32)
        return np.concatenate([self._infer(chunk) for chunk in self.chunks(batch)])  # (N, D)

    def health(self) -> bool:
        probe = np.zeros((1, 3, self.input_size, self.input_size), dtype=np.float32)
        try:
            out = self.embed(probe)
        except Exception:  # health reports, never raises: whatever the runtime throws means "cannot serve"
            log.exception("%s: health check inference failed", self.name)
            return False
        return out.shape == (1, self.embedding_size) and bool(np.isfinite(out).all())


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


def embed_aligned(engine: Engine, card: ModelCard, faces: np.ndarray) -> np.ndarray:
    """Raw embeddings (N, D) of aligned uint8 RGB faces (N, S, S, 3), with the card's flip TTA.

    With flip_tta, f = f(x) + f(mirror(x)): the sum, not the mean, as MagFace-style magnitudes
    and the card's quality range are measured on the same sum.
    """
    x = preprocess(faces, card)
    return merge_tta(engine.embed(with_tta(x, card)), card)


def with_tta(x: np.ndarray, card: ModelCard) -> np.ndarray:
    """The network input for `x` (N, 3, S, S) under the card's TTA: (2N, …), faces then their mirror images."""
    return np.concatenate([x, x[..., ::-1]]) if card.flip_tta else x


def merge_tta(out: np.ndarray, card: ModelCard) -> np.ndarray:
    """Raw embeddings (N, D) from the outputs of `with_tta`'s input."""
    if not card.flip_tta:
        return out
    n = len(out) // 2
    return out[:n] + out[n:]


class StyleRowsEngine:
    """An `Engine` whose rows are [raw embedding (D) | style statistics (S)] of one inference.

    Lets the dynamic batcher, which moves rows, carry both outputs of a card with a CAFace style
    output; `split_rows` takes them apart again after the card's TTA.
    """

    def __init__(self, engine) -> None:
        card = engine.card
        if card.outputs.style is None or not hasattr(engine, "embed_with_style"):
            raise ModelCardError(f"{engine.name}: the model has no style output, or the runtime cannot return it")
        self.engine, self.card, self.name = engine, card, engine.name
        self.input_size, self.max_batch_size = engine.input_size, engine.max_batch_size
        self.style_size = 2 * sum(card.outputs.style_channels)
        self.embedding_size = engine.embedding_size + self.style_size

    def embed(self, batch: np.ndarray) -> np.ndarray:
        embedding, style = self.engine.embed_with_style(batch)
        return np.concatenate([embedding, style], axis=1).astype(np.float32, copy=False)  # (N, D + S)

    def health(self) -> bool:
        return self.engine.health()


def split_rows(rows: np.ndarray, card: ModelCard) -> tuple[np.ndarray, np.ndarray | None]:
    """Rows of `with_tta` input -> (raw embeddings (N, D), style (N, S) or None).

    With flip TTA the embedding is the sum of the two views (as `merge_tta`) and the style the
    mean of their statistics: the embedding is made of both views, so its style describes both.
    """
    d = card.embedding_size
    embedding = merge_tta(rows[:, :d], card)
    if rows.shape[1] == d:
        return embedding, None
    style = rows[:, d:]
    if card.flip_tta:
        n = len(style) // 2
        style = (style[:n] + style[n:]) / 2
    return embedding, style
