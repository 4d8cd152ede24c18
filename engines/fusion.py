"""CAFace template fusion at serving time: two ONNX graphs, an additive memory, numpy + ONNX Runtime only.

    fusion = FusionModel.load("models/caface")                    # a card.yaml or its folder
    out = run_aligned(engine, card, faces)                         # engines.base: the recognition card's engine,
    frames = fusion.assign(out["embedding"], out["style"])         # its flip TTA (style = mean over the views)
    delta = fusion.memory_delta(frames)                            # what a store adds to the template's memory
    template = fusion.aggregate(*delta)                            # unit embedding (D,), quality, weights (M, D)

`assign` (ONNX graph "assign") maps each frame on its own, never looking at other frames, to its
assignment A_i (M,) over the M clusters (Σ_m A_{m,i} = 1), its unit embedding f̂_i = f_i/‖f_i‖ (D,)
and its stored style s_i (K,): learned components, then the frame's quality r_i (entry
`frame_quality_index`, K − 2) and its raw magnitude ‖f_i‖ (entry `magnitude_index`, K − 1). The memory of a
template is the per-cluster sums over its frames

    S_m = Σ_i A_{m,i} f̂_i  (M, D)     T_m = Σ_i A_{m,i} s_i  (M, K)     c_m = Σ_i A_{m,i}  (M,)

so appending frames is addition: any order or batching gives the same memory up to the rounding
of the sum, and the memory's size never grows (M·(D + K + 1) floats). `memory_delta` gives a
contribution's share in float64 (products of the graph's float32 outputs, summed in float64), the
numbers a store adds. Redis's HINCRBYFLOAT adds in long double and stores the result with 17 digits
after the decimal point, so appends in another order give sums that differ by ~1e-17 absolute (send
each increment as repr(float) so it round-trips; increments below 1e-17 are lost, far below what the
template can notice). Σ_m c_m is the number of frames. Keep one frame's delta per request item (`FrameContribution.frame(i)`) where a client may
retry it: a store can then refuse a repeated frame id without a half-counted frame.

`aggregate` (ONNX graph "aggregate") reads the memory only and returns the fused template
f = Σ_m w_m ⊙ F_m, F_m = S_m / max(1, c_m), L2-normalised (D,) float32, the per-channel weights
w (M, D) (softmax over m), and the template quality in [0, 1]:

    q = 1 − exp(−Σ_m T_m[r] / τ) = 1 − exp(−Σ_i r_i / τ),   τ = card.quality.evidence_frames

where r_i = s_i[card.frame_quality_index] ∈ [0, 1] is each frame's quality, computed by the assign
graph from that frame alone (its style statistics and magnitude) and trained to predict
clip((cos(f̂_i, W_y^(−i)) − a)/(b − a), 0, 1), the frame's cosine to the person's other photos
((a, b) = card.quality.frame_quality_range). So q is the evidence the template has gathered: every
frame raises it by its own r_i (a good frame a lot, a blurred or occluded one little), in any order,
and it is a function of the memory. With τ = 2, one perfect frame gives 0.39, two 0.63, four 0.86.
`FrameContribution.frame_quality` gives r_i, e.g. to report frames below a floor. The graphs run in
float32 (the memory is cast on the way in).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal, NamedTuple

import numpy as np
import onnxruntime as ort
import yaml
from pydantic import Field

from engines.model_card import (
    CARD_FILENAME,
    FileEntry,
    ModelCard,
    ModelCardError,
    Provenance,
    TrainingInfo,
    _Strict,
    atomic_write_bytes,
    sha256_file,
)

ASSIGN_INPUTS = ("raw_embedding", "style")
ASSIGN_OUTPUTS = ("assignment", "unit_embedding", "stored_style")
AGGREGATE_INPUTS = ("sums", "style_sums", "counts")
AGGREGATE_OUTPUTS = ("embedding", "weights", "quality")


class EmptyTemplateError(ValueError):
    """A memory with no frames has no template."""


# ---- the card ----------------------------------------------------------------------------


class FusionFiles(_Strict):
    assign: FileEntry = Field(description="Per-frame graph: raw_embedding (N, D), style (N, S) -> assignment (N, M), "
                              "unit_embedding (N, D), stored_style (N, K).")
    aggregate: FileEntry = Field(description="Memory graph: sums (M, D), style_sums (M, K), counts (M,) -> embedding "
                                 "(D,), weights (M, D), quality ().")


class RecognitionModel(_Strict):
    name: str = Field(description="The recognition model card's name the fusion was trained on.")
    version: str = Field(description="Its version.")
    onnx_sha256: str = Field(pattern=r"^[0-9a-f]{64}$", description="sha256 of its ONNX.")
    style_channels: list[int] = Field(description="Its outputs.style_channels (S = 2·Σ).")
    tta: str = Field(description="How frames are embedded: the card's flip TTA and how the style is combined.")


class FusionQuality(_Strict):
    method: Literal["frame_quality_evidence"] = Field(
        "frame_quality_evidence", description="q = 1 − exp(−Σ_i r_i / evidence_frames), r_i the per-frame quality "
        "(stored style entry frame_quality_index), summed in the memory as Σ_m T_m[frame_quality_index].")
    low: float = Field(description="Magnitudes enter the network as (‖f‖ − low)/(high − low): the recognition card's "
                       "quality.low, or for a card without quality the training features' 1st percentile.")
    high: float = Field(description="The recognition card's quality.high, or the features' 99th percentile.")
    evidence_frames: float = Field(gt=0, description="τ: frames of quality 1 that bring q to 1 − 1/e.")
    frame_quality_range: list[float] = Field(min_length=2, max_length=2, description="(a, b): r_i is trained towards "
                                             "clip((cos(f̂_i, centre of the person's other photos) − a)/(b − a), 0, 1).")


class FusionParity(_Strict):
    reference: str = Field(description="What the graphs were compared with.")
    runtime: str
    inputs: str = Field(description="Which frames and memories.")
    assign_max_abs_diff: float = Field(description="Largest |torch − ORT| over A, f̂ and s (relative for s).")
    aggregate_min_cosine: float = Field(description="Smallest cosine between torch's and ORT's fused embeddings.")
    quality_max_abs_diff: float


class FusionCard(_Strict):
    card_version: Literal[1] = 1
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    version: str = Field(min_length=1)
    method: Literal["caface_additive"] = Field("caface_additive", description="CAFace with per-frame assignment "
                                               "(training.caface.model): the memory is a sum over frames.")
    files: FusionFiles
    clusters: int = Field(gt=1, description="M.")
    embedding_size: int = Field(gt=0, description="D.")
    style_size: int = Field(gt=0, description="S, the recognition model's style width.")
    stored_style_size: int = Field(gt=0, description="K, the stored style per frame.")
    frame_quality_index: int = Field(description="Entry of the stored style holding the frame quality r_i (K − 2).")
    magnitude_index: int = Field(description="Entry of the stored style holding ‖f_i‖ (K − 1).")
    memory_dtype: Literal["float64"] = Field("float64", description="Sums are kept in float64; the graphs take float32.")
    recognition: RecognitionModel
    quality: FusionQuality
    training: TrainingInfo
    parity: FusionParity | None = None
    licence: str
    provenance: Provenance

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> tuple[FusionCard, Path]:
        path = Path(path)
        path = path / CARD_FILENAME if path.is_dir() else path
        card = cls.model_validate(yaml.safe_load(path.read_text()))
        if verify:
            for key, entry in card.files:
                found = path.parent / entry.path
                if not found.is_file() or sha256_file(found) != entry.sha256:
                    raise ModelCardError(f"{found}: missing or not the card's sha256 (files.{key})")
        return card, path.parent

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / CARD_FILENAME
        text = yaml.safe_dump(self.model_dump(mode="python"), sort_keys=False, width=120, allow_unicode=True)
        return atomic_write_bytes(path, text.encode())


# ---- frames, memory, template --------------------------------------------------------------


class FrameContribution(NamedTuple):
    """What `assign` makes of N frames; every row depends on its own frame only."""

    assignment: np.ndarray  # (N, M) float32, rows sum to 1
    unit_embedding: np.ndarray  # (N, D) float32, f̂_i
    style: np.ndarray  # (N, K) float32, s_i; s_i[K − 2] = r_i (frame quality), s_i[K − 1] = ‖f_i‖

    @property
    def frame_quality(self) -> np.ndarray:
        """r_i (N,) in [0, 1]: each frame's own quality (the stored style's entry K − 2)."""
        return self.style[:, -2]

    @property
    def magnitude(self) -> np.ndarray:
        """‖f_i‖ (N,): the raw embedding's magnitude (the stored style's last entry)."""
        return self.style[:, -1]

    def frame(self, i: int) -> FrameContribution:
        return FrameContribution(self.assignment[i : i + 1], self.unit_embedding[i : i + 1], self.style[i : i + 1])


class MemoryDelta(NamedTuple):
    sums: np.ndarray  # (M, D) float64, Σ_i A_{m,i} f̂_i
    style_sums: np.ndarray  # (M, K) float64, Σ_i A_{m,i} s_i
    counts: np.ndarray  # (M,) float64, Σ_i A_{m,i}

    def to_vector(self) -> np.ndarray:
        """(M·(D + K + 1),) float64: [S (M·D, row-major), T (M·K), c (M)], the layout service.templates stores.

        One flat layout for a store (one Lua array slot per entry); adding two vectors adds the two memories.
        """
        return np.concatenate([self.sums.ravel(), self.style_sums.ravel(), self.counts])

    @classmethod
    def from_vector(cls, vector: np.ndarray, clusters: int, embedding_size: int) -> MemoryDelta:
        vector = np.asarray(vector, dtype=np.float64)
        m, d = clusters, embedding_size
        k = (len(vector) - m * (d + 1)) // m
        return cls(vector[: m * d].reshape(m, d), vector[m * d : m * (d + k)].reshape(m, k), vector[m * (d + k) :])


class FusedTemplate(NamedTuple):
    embedding: np.ndarray  # (D,) float32, unit norm
    quality: float  # in [0, 1]
    weights: np.ndarray  # (M, D) float32, Σ_m = 1 per channel


class FusionModel:
    """The card's two graphs on ONNX Runtime (CPU by default; the graphs are tiny)."""

    def __init__(self, card: FusionCard, root: Path, providers: list[str] | None = None, threads: int = 1) -> None:
        self.card, self.root = card, root
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        providers = providers or ["CPUExecutionProvider"]
        self.assign_session = ort.InferenceSession(str(root / card.files.assign.path), options, providers=providers)
        self.aggregate_session = ort.InferenceSession(str(root / card.files.aggregate.path), options, providers=providers)
        self.clusters, self.embedding_size = card.clusters, card.embedding_size

    @classmethod
    def load(cls, card: str | Path, **kwargs) -> FusionModel:
        """From a fusion card.yaml or its folder; every file's sha256 is checked."""
        loaded, root = FusionCard.load(card)
        return cls(loaded, root, **kwargs)

    def assign(self, raw_embeddings: np.ndarray, style: np.ndarray) -> FrameContribution:
        """Raw embeddings (N, D) and style statistics (N, S), as the recognition card's engine gives them."""
        raw = np.ascontiguousarray(raw_embeddings, dtype=np.float32)
        style = np.ascontiguousarray(style, dtype=np.float32)
        c = self.card
        if raw.ndim != 2 or raw.shape[1] != c.embedding_size or style.shape != (len(raw), c.style_size):
            raise ValueError(f"need raw embeddings (N, {c.embedding_size}) and style (N, {c.style_size}), "
                             f"got {raw.shape} and {style.shape}")
        if not len(raw):
            return FrameContribution(np.zeros((0, c.clusters), np.float32), np.zeros((0, c.embedding_size), np.float32),
                                     np.zeros((0, c.stored_style_size), np.float32))
        outs = self.assign_session.run(list(ASSIGN_OUTPUTS), dict(zip(ASSIGN_INPUTS, (raw, style))))
        return FrameContribution(*outs)

    def memory_delta(self, contribution: FrameContribution) -> MemoryDelta:
        """The contribution's sums over its frames, in float64: add it to a template's memory."""
        a = contribution.assignment.astype(np.float64)  # (N, M)
        return MemoryDelta(a.T @ contribution.unit_embedding.astype(np.float64),  # (M, N) @ (N, D) -> (M, D)
                           a.T @ contribution.style.astype(np.float64),  # (M, K)
                           a.sum(axis=0))  # (M,)

    @property
    def memory_size(self) -> int:
        """Floats in a template's memory: M·(D + K + 1), whatever the number of frames."""
        c = self.card
        return c.clusters * (c.embedding_size + c.stored_style_size + 1)

    def memory_from_vector(self, vector: np.ndarray) -> MemoryDelta:
        """The memory of a store's flat vector (`MemoryDelta.to_vector`'s layout)."""
        if np.shape(vector) != (self.memory_size,):
            raise ValueError(f"a memory vector has {self.memory_size} entries, got {np.shape(vector)}")
        return MemoryDelta.from_vector(vector, self.clusters, self.embedding_size)

    def aggregate(self, sums: np.ndarray, style_sums: np.ndarray, counts: np.ndarray) -> FusedTemplate:
        """The template of a memory: unit embedding (D,), quality in [0, 1], weights (M, D)."""
        c = self.card
        counts = np.asarray(counts, dtype=np.float64)
        if counts.shape != (c.clusters,) or np.shape(sums) != (c.clusters, c.embedding_size) \
                or np.shape(style_sums) != (c.clusters, c.stored_style_size):
            raise ValueError(f"need memory ({c.clusters}, {c.embedding_size}), ({c.clusters}, {c.stored_style_size}), "
                             f"({c.clusters},); got {np.shape(sums)}, {np.shape(style_sums)}, {counts.shape}")
        if not counts.sum() > 0:
            raise EmptyTemplateError("the template has no frames")
        feed = {name: np.asarray(x, dtype=np.float32) for name, x in zip(AGGREGATE_INPUTS, (sums, style_sums, counts))}
        embedding, weights, quality = self.aggregate_session.run(list(AGGREGATE_OUTPUTS), feed)
        return FusedTemplate(embedding.astype(np.float32), float(quality), weights.astype(np.float32))

    def fuse(self, raw_embeddings: np.ndarray, style: np.ndarray) -> FusedTemplate:
        """All frames at once: assign, sum, aggregate."""
        return self.aggregate(*self.memory_delta(self.assign(raw_embeddings, style)))
