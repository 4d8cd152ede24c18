"""Where a card's per-face quality comes from: a registry of quality sources, each a per-face score s.

    source = card_source(card)                     # the card's validated source, or None (quality null)
    q = face_quality(card, {"embedding": raw, "style": style})   # (N,) in [0, 1], or None

A source turns a model's per-face outputs ({"embedding": (N, D) raw, "style": (N, S)}) into a score that should
rise with how recognisable the face is; the card's `quality` maps it to [0, 1] by clip((s − low)/(high − low)).
Calibration (engines.calibration) tries every source a card offers (`candidates`) with the same
error-versus-reject check and keeps one only where rejecting the lowest-scored faces lowers FNMR:

  magnitude     ‖f‖, where the card says the model was trained with MagFace (`magnitude`): Quality method
                "magface_linear".
  learned_head  the card's `quality_head` ONNX (training.caface.quality_head: a small network trained for this
                model to predict a face's CR-FIQA recognisability from its style statistics and magnitude): Quality
                method "learned_head". Needs the style output; ONNX Runtime, no torch.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import onnxruntime as ort

from engines.base import EMBEDDING, STYLE
from engines.model_card import ModelCard, ModelCardError, Quality
from engines.registry import Registry

QUALITY_SOURCES: Registry = Registry("quality source")
HEAD_INPUTS, HEAD_OUTPUT = ("style", "magnitude"), "score"
MAPPING_PERCENTILES = (1.0, 99.0)


@QUALITY_SOURCES.register("magnitude")
class MagnitudeSource:
    """s = ‖f‖ of the raw embedding (MagFace: the magnitude grows with recognisability)."""

    method, needs = "magface_linear", (EMBEDDING,)

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    @staticmethod
    def offered(card: ModelCard) -> bool:
        return card.magnitude is not None

    def scores(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        return np.linalg.norm(np.asarray(outputs[EMBEDDING], np.float64), axis=1)


@lru_cache(maxsize=8)
def _head_session(path: Path, sha256: str) -> ort.InferenceSession:
    # keyed by the file's hash as well: a retrained head at the same path is a new session
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # a few thousand multiply-adds per face: threads would cost more than they save
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


@QUALITY_SOURCES.register("learned_head")
class LearnedHeadSource:
    """s = the card's quality head on the face's style statistics and magnitude."""

    method, needs = "learned_head", (EMBEDDING, STYLE)

    def __init__(self, card: ModelCard) -> None:
        self.card = card
        self.session = _head_session(card.root / card.quality_head.onnx.path, card.quality_head.onnx.sha256)

    @staticmethod
    def offered(card: ModelCard) -> bool:
        return card.quality_head is not None and card.outputs.style is not None

    def scores(self, outputs: dict[str, np.ndarray]) -> np.ndarray:
        if len(outputs[EMBEDDING]) == 0:  # no face (a batch of none has no style rows either)
            return np.zeros(0)
        style = outputs.get(STYLE)
        if style is None:
            raise ModelCardError(f"model {self.card.name!r}: its learned quality needs the style output, not given")
        magnitude = np.linalg.norm(np.asarray(outputs[EMBEDDING], np.float64), axis=1, keepdims=True)  # (N, 1)
        feed = dict(zip(HEAD_INPUTS, (np.asarray(style, np.float32), magnitude.astype(np.float32))))
        return self.session.run([HEAD_OUTPUT], feed)[0][:, 0].astype(np.float64)  # (N,)


def candidates(card: ModelCard, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Source name -> per-face scores (N,) of every source the card offers and `outputs` can feed."""
    found = {}
    for name in QUALITY_SOURCES.names():
        source = QUALITY_SOURCES.get(name)
        if source.offered(card) and all(outputs.get(k) is not None for k in source.needs):
            found[name] = source(card).scores(outputs)
    return found


def source_name(method: str) -> str:
    """The source whose scores a Quality `method` maps."""
    for name in QUALITY_SOURCES.names():
        if QUALITY_SOURCES.get(name).method == method:
            return name
    raise KeyError(f"no quality source makes {method!r}")


def card_source(card: ModelCard):
    """The source of the card's quality, built for it; None where the card has no quality."""
    return None if card.quality is None else QUALITY_SOURCES.build(source_name(card.quality.method), card=card)


def mapping(source: str, scores: np.ndarray) -> Quality:
    """A quality mapping for `source` spanning the 1st to the 99th percentile of `scores` (hold-out faces)."""
    low, high = np.percentile(scores, MAPPING_PERCENTILES)
    return Quality(method=QUALITY_SOURCES.get(source).method, low=float(low), high=float(high))


def mapped(quality: Quality, scores) -> np.ndarray:
    """q = clip((s − low)/(high − low), 0, 1)."""
    return np.clip((np.asarray(scores, np.float64) - quality.low) / (quality.high - quality.low), 0.0, 1.0)


def face_quality(card: ModelCard, outputs: dict[str, np.ndarray], source=None) -> np.ndarray | None:
    """Per-face quality (N,) in [0, 1] through the card's source (`source`: one built already), or None."""
    source = source or card_source(card)
    return None if source is None else mapped(card.quality, source.scores(outputs))
