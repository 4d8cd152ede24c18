"""The torch engine: the training framework itself behind the engine interface, for development and parity.

    engine = build_engine("torch", checkpoint="runs/NAME/backbone.pt", card="models/NAME")
    raw = embed_aligned(engine, engine.card, faces_uint8)   # the same call as for any runtime

It reads any checkpoint `training.evaluate.load_backbone` reads (a backbone.pt, a converted dlib
checkpoint, a training checkpoint directory) and takes the same card-preprocessed input as the
ONNX: the card's scaling and channel order are converted to the backbone's own
(p − 127.5)/127.5 RGB by `training.export.ExportModule`, the module the ONNX export traces. So
this engine and the card's ONNX must agree face by face; a disagreement is an export bug. It
returns the embedding only (`outputs`): a service on it runs with CAFace templates off.

torch (and `training`) are imported when an engine is built, never at import: this module is
only loaded when the "torch" runtime is asked for (engines.base.RUNTIME_MODULES).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from engines.base import EMBEDDING, ENGINES, ChunkedEngine
from engines.model_card import ModelCard, ModelCardError

__all__ = ["TorchEngine"]


@ENGINES.register("torch")
class TorchEngine(ChunkedEngine):
    """A torch backbone in eval mode, fed card-preprocessed input.

    checkpoint: what `training.evaluate.load_backbone` accepts.
    card: the model's ModelCard (or its card.yaml / folder): input size, scaling, channel order
        and embedding size. Its files are not checked (the torch engine does not read the ONNX).
    device: a torch device name ("cpu", "cuda", "cuda:1").
    max_batch_size: the most faces per forward pass.
    threads: torch intra-op threads when given (torch.set_num_threads is process-wide).
    """

    runtime = "torch"

    def __init__(self, checkpoint: str | Path, card: ModelCard | str | Path, device: str = "cpu",
                 max_batch_size: int = 64, threads: int | None = None) -> None:
        import torch

        from training.evaluate import load_backbone
        from training.export import ExportModule

        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if threads:
            torch.set_num_threads(threads)
        # the backbone alone: no CAFace style output, whatever the card's ONNX has
        self._use_card(card, verify=False, names=(EMBEDDING,))
        self.max_batch_size = max_batch_size
        self.device = torch.device(device)
        backbone, size = load_backbone(str(checkpoint), self.device)
        if size != self.input_size:
            raise ModelCardError(f"{checkpoint}: input size {size} != the card's {self.input_size}")
        spec = self.card.input
        self.module = ExportModule(backbone, spec.channel_order, spec.mean, spec.std).to(self.device).eval()
        self._torch = torch
        width = self._infer(np.zeros((1, 3, size, size), np.float32))[EMBEDDING].shape[1]
        if width != self.embedding_size:
            raise ModelCardError(f"{checkpoint}: embedding width {width} != the card's {self.embedding_size}")

    def _infer(self, chunk: np.ndarray) -> dict[str, np.ndarray]:
        torch = self._torch
        with torch.inference_mode():
            out = self.module(torch.from_numpy(chunk).to(self.device))  # (n, D)
        return {EMBEDDING: out.float().cpu().numpy()}
