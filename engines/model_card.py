"""The recognition model card: everything an engine needs to run a model, beside its ONNX file.

A card is a YAML file (``card.yaml``) next to the model; `training.export` writes it and engines
read it. It is validated into the pydantic models below, and unknown keys are refused: a misspelt
key must fail loudly rather than silently leave a default in force. Paths in the card are
relative to the card's folder, so a model folder can be moved or shipped as a whole. Loading
checks every file's sha256 (`ModelCard.verify_files`), so a swapped or truncated ONNX fails at
start-up, not as wrong embeddings later.

Nothing here imports torch: the service reads cards.

Conventions the fields rely on:
  input       aligned uint8 RGB faces of side `input.size`, made with the 5-point template named
              `input.template` (engines.reference_landmarks); the model sees x = (p − mean)/std per channel,
              channels in `input.channel_order`, layout NCHW (`engines.base.preprocess`).
  embedding   the raw network output f (not normalised): ‖f‖ is the magnitude, f/‖f‖ is compared
              by cosine. With `flip_tta`, f = f(image) + f(mirrored image).
  quality     q = clip((s − low)/(high − low), 0, 1) of a per-face score s from a validated source
              (engines.quality_sources): "magface_linear", s = ‖f‖ of a MagFace-trained model; "learned_head",
              s = the output of the card's `quality_head` (a small network trained for this model on its style
              statistics and magnitude). Only where calibration validated the source (`QualityCheck`: its
              error-versus-reject curve falls); otherwise null, and nothing (bands, floors, the service) gates on
              quality.
  calibration cosine thresholds of f/‖f‖ at given false accept rates (FAR), measured on data not
              used for training. Card version 2 adds, from the same hold-out: the open-set tail model
              (FPIR(t, N), `OpenSet`), FAR thresholds per pair-quality band (`QualityBand`) and the
              quality floors of probes and enrolments (`QualityFloors`). Version 1 cards keep working
              with FAR thresholds only.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from engines.atomic import atomic_write_bytes, fsync_file, sha256_file, temp_path_beside  # noqa: F401 (re-exported)

CARD_FILENAME = "card.yaml"
CARD_VERSION = 2
SHA256_PATTERN = r"^[0-9a-f]{64}$"


class ModelCardError(ValueError):
    """A card that cannot be used: a file missing or altered, or a question it cannot answer."""


class _Strict(BaseModel):
    # extra="forbid": unknown keys are refused with their path in the error
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class FileEntry(_Strict):
    path: str = Field(description="Path of the file, relative to the card's folder.")
    sha256: str = Field(pattern=SHA256_PATTERN, description="Hex sha256 of the file's bytes, checked on load.")

    @field_validator("path")
    @classmethod
    def _relative(cls, value: str) -> str:
        if not value or Path(value).is_absolute():
            raise ValueError(f"file paths are relative to the card's folder, got {value!r}")
        return value


class Files(_Strict):
    onnx: FileEntry = Field(description="The ONNX graph: input (N, 3, size, size) float32, dynamic N.")


class InputSpec(_Strict):
    size: int = Field(gt=0, description="Side of the square aligned face, in pixels.")
    template: str = Field(min_length=1, description="Name of the 5-point reference landmarks (engines.reference_landmarks), "
                          "e.g. 'arcface_112' or 'dlib_150'; it is scaled to `size`.")
    channel_order: Literal["RGB", "BGR"] = Field("RGB", description="Channel order the network reads.")
    mean: list[float] = Field(min_length=3, max_length=3, description="Per-channel mean subtracted from pixels "
                              "0..255, in `channel_order`.")
    std: list[float] = Field(min_length=3, max_length=3, description="Per-channel divisor, in `channel_order`: "
                             "x = (p − mean)/std.")
    layout: Literal["NCHW"] = Field("NCHW", description="Tensor layout of the network input.")

    @field_validator("std")
    @classmethod
    def _positive(cls, value: list[float]) -> list[float]:
        if not all(s > 0 for s in value):
            raise ValueError(f"std must be positive, got {value}")
        return value


class Outputs(_Strict):
    embedding: str = Field("embedding", description="Name of the ONNX output holding the raw embedding (N, D).")
    style: str | None = Field(None, description="Name of the optional ONNX output holding per-channel (mean, std) "
                              "of the intermediate feature maps (N, 2·Σ C_i), for CAFace; null when absent.")
    style_channels: list[int] | None = Field(None, description="C_i of each intermediate map in `style`, shallowest "
                                             "first; style[:, 2k] is channel k's mean and style[:, 2k + 1] its std.")

    @model_validator(mode="after")
    def _style_together(self) -> Outputs:
        if (self.style is None) != (self.style_channels is None):
            raise ValueError("outputs.style and outputs.style_channels go together (both set or both null)")
        return self


class Magnitude(_Strict):
    l_a: float = Field(gt=0, description="MagFace's lower magnitude bound used in training.")
    u_a: float = Field(gt=0, description="MagFace's upper magnitude bound used in training.")

    @model_validator(mode="after")
    def _ordered(self) -> Magnitude:
        if not self.l_a < self.u_a:
            raise ValueError(f"need l_a < u_a, got {self.l_a}, {self.u_a}")
        return self


class Quality(_Strict):
    method: Literal["magface_linear", "learned_head"] = Field("magface_linear", description="The score s: "
                                                               "magface_linear ‖f‖, learned_head the card's "
                                                               "quality_head output; q = clip((s − low)/(high − low), 0, 1).")
    low: float = Field(description="Score that maps to quality 0.")
    high: float = Field(description="Score that maps to quality 1.")

    @model_validator(mode="after")
    def _ordered(self) -> Quality:
        if not self.low < self.high:
            raise ValueError(f"need quality.low < quality.high, got {self.low}, {self.high}")
        return self


class OpenSet(_Strict):
    """FPIR(t, N): the share of non-mated searches whose best score among N enrolled identities reaches t.

    Peaks over threshold: impostor cosines above u (a fraction `zeta` of them) follow a generalised
    Pareto tail, P(s ≥ t) = zeta·(1 + xi·(t − u)/sigma)^(−1/xi) for t ≥ u; a search of N identities amounts to
    k(N) = min(N, theta·N^exponent) independent comparisons, FPIR(t, N) = 1 − (1 − P(s ≥ t))^k(N)
    (engines.open_set; theta = exponent = 1 is independence, as cards calibrated before that fit assume).
    Checked against measured maxima at `gallery_sizes`."""

    model: Literal["gpd_tail"] = Field("gpd_tail", description="The tail model above.")
    u: float = Field(ge=-1, le=1, description="Cosine where the tail starts.")
    zeta: float = Field(gt=0, lt=1, description="Share of impostor scores above u.")
    xi: float = Field(description="GPD shape (negative: bounded tail).")
    sigma: float = Field(gt=0, description="GPD scale.")
    theta: float = Field(1.0, gt=0, description="k(N) = min(N, theta·N^exponent): the independent comparisons a "
                         "search of N identities amounts to (fitted to hold-out maxima).")
    exponent: float = Field(1.0, gt=0, le=1.5, description="See theta.")
    duplicates: int = Field(0, ge=0, description="Hold-out identity pairs taken for one person and left out of the "
                            "impostors (mean cross cosine above the median genuine cosine).")
    fpir_range: list[float] = Field(min_length=2, max_length=2, description="[lowest, highest] FPIR served: "
                                    "the range checked against measured values.")
    gallery_sizes: list[int] = Field(min_length=1, description="The N at which measured FPIR was compared.")
    max_ratio: float = Field(gt=0, description="Worst measured/predicted FPIR (or its inverse) over those checks.")
    probes: int = Field(gt=0, description="Non-mated searches measured at the largest N.")
    method: str = Field(description="How it was fitted and checked.")

    @model_validator(mode="after")
    def _range(self) -> OpenSet:
        low, high = self.fpir_range
        if not 0 < low <= high < 1:
            raise ValueError(f"fpir_range must satisfy 0 < low <= high < 1, got {self.fpir_range}")
        return self


class QualityBand(_Strict):
    """FAR thresholds for pairs whose lower face quality lies in [low, high)."""

    low: float = Field(ge=0, le=1)
    high: float = Field(ge=0, le=1)
    thresholds: dict[float, float] = Field(min_length=1, description="FAR -> cosine threshold in this band.")
    positive_pairs: int = Field(ge=0)
    negative_pairs: int = Field(gt=0)


class QualityFloors(_Strict):
    probe: float = Field(ge=0, le=1, description="Searches with a probe below it are answered low_quality.")
    enrolment: float = Field(ge=0, le=1, description="Enrolments whose best photo is below it are refused (unless forced).")
    rule: str = Field(description="How the floors were read off the hold-out's error-versus-quality curve.")


class QualityCheck(_Strict):
    """An error-versus-reject check of a quality source on the calibration hold-out (engines.calibration): FNMR at
    FMR `fmr` (threshold set once on all pairs) after rejecting each fraction of the lowest-quality pairs."""

    source: Literal["magnitude", "learned_head"] = Field(description="magnitude: ‖f‖ of a MagFace-trained model (the "
                                                         "card's `magnitude`); learned_head: the card's quality_head.")
    fmr: float = Field(gt=0, lt=1)
    reject: list[float] = Field(min_length=2, description="Fractions of the pairs rejected, lowest lower-quality first.")
    fnmr: list[float] = Field(min_length=2, description="FNMR of the kept genuine pairs at each fraction.")
    min_gain: float = Field(ge=0, lt=1, description="Relative FNMR drop at the largest fraction needed to use the source.")
    genuine_pairs: int = Field(gt=0)
    impostor_pairs: int = Field(gt=0)
    used: bool = Field(description="Whether the card's quality comes from this source.")

    @model_validator(mode="after")
    def _curve(self) -> QualityCheck:
        if len(self.reject) != len(self.fnmr):
            raise ValueError(f"quality check: {len(self.reject)} reject fractions but {len(self.fnmr)} FNMR values")
        return self


class Calibration(_Strict):
    thresholds: dict[float, float] = Field(min_length=1, description="FAR -> cosine threshold; a pair matches when "
                                           "cos ≥ threshold. Usually FAR 1e-2, 1e-3 and 1e-4.")
    dataset: str = Field(description="Where it was measured (data not used for training).")
    positive_pairs: int = Field(ge=0, description="Genuine pairs measured.")
    negative_pairs: int = Field(gt=0, description="Impostor pairs measured; a FAR below 1/negative_pairs cannot be.")
    method: str = Field(description="How: pipeline and the rule that picks each threshold.")
    open_set: OpenSet | None = Field(None, description="FPIR(t, N) for 1:N decisions (card version 2).")
    quality_bands: list[QualityBand] = Field(default_factory=list, description="FAR thresholds by the pair's lower "
                                             "quality, bands in order covering [0, 1] (card version 2).")
    floors: QualityFloors | None = Field(None, description="Quality floors (card version 2).")
    quality_checks: list[QualityCheck] = Field(default_factory=list, description="Error-versus-reject checks of the "
                                               "quality sources tried; the card's quality is null unless one was used.")
    command: str | None = Field(None, description="The command that made this calibration (faceset model calibrate as "
                                "run); null on cards calibrated before it was recorded.")

    @model_validator(mode="after")
    def _consistent(self) -> Calibration:
        for far, threshold in self.thresholds.items():
            if not 0 < far < 1:
                raise ValueError(f"calibration FAR must be in (0, 1), got {far}")
            if not -1 <= threshold <= 1:
                raise ValueError(f"a cosine threshold lies in [-1, 1], got {threshold} at FAR {far}")
            if far * self.negative_pairs < 1:
                raise ValueError(f"FAR {far} cannot be measured on {self.negative_pairs} impostor pairs "
                                 f"(needs at least {math.ceil(1 / far)})")
        # a stricter FAR can never need a lower threshold
        ordered = sorted(self.thresholds.items())
        for (far_a, t_a), (far_b, t_b) in zip(ordered, ordered[1:]):
            if t_a < t_b:
                raise ValueError(f"threshold at FAR {far_a} ({t_a}) is below the one at the looser FAR {far_b} ({t_b})")
        return self


class TrainingInfo(_Strict):
    data: str = Field(description="Training data (datasets and subsets).")
    licence: str = Field(description="Terms of the training data (e.g. CelebA: non-commercial research only).")
    recipe: str = Field(description="The command that reproduces the training.")
    notes: str | None = Field(None, description="Anything else a user must know (starting weights, deviations).")


class Accuracy(_Strict):
    benchmark: str = Field(description="e.g. 'LFW dev fold (600 pairs)'.")
    value: float = Field(description="The figure, in the protocol's unit (accuracy in %, TAR …).")
    std: float | None = Field(None, description="Standard deviation over folds, when the protocol has folds.")
    protocol: str = Field(description="How it was measured (pipeline, folds, threshold rule).")


class Parity(_Strict):
    reference: str = Field(description="What the ONNX was compared with, e.g. 'torch 2.13.0 fp32'.")
    runtime: str = Field(description="The runtime that ran the ONNX.")
    inputs: str = Field(description="Which faces were used.")
    images: int = Field(gt=0, description="How many.")
    min_cosine: float = Field(description="Smallest cosine between the two embeddings of a face.")
    max_norm_rel_diff: float = Field(description="Largest |‖a‖ − ‖b‖|/‖a‖: magnitudes are the quality.")
    style_min_cosine: float | None = Field(None, description="Smallest cosine between the style outputs, if any.")


class QualityHead(_Strict):
    """A per-face quality network trained for this model (training.caface.quality_head): ONNX inputs `style` (N, S),
    the model's style output, and `magnitude` (N, 1), ‖f‖; output `score` (N, 1), its prediction of the face's
    recognisability. A candidate quality source only: the card's quality uses it once calibration validated it."""

    onnx: FileEntry = Field(description="The head's ONNX, beside the card.")
    target: str = Field(description="What it was trained to predict, on which faces.")
    data: str = Field(description="Training data (never the calibration hold-out or an evaluation set).")
    validation: str = Field(description="Its agreement with the target on identities it was not trained on.")
    parity_max_abs_diff: float = Field(ge=0, description="Largest |ONNX − torch| of the score on training faces.")
    command: str | None = Field(None, description="The command that trained it.")


class Provenance(_Strict):
    source: str = Field(description="Where the weights come from (checkpoint, upstream model, author).")
    source_sha256: str | None = Field(None, pattern=SHA256_PATTERN, description="sha256 of the source file.")
    exporter: str | None = Field(None, description="Tool and versions that wrote the ONNX.")
    command: str | None = Field(None, description="The command that produced this folder.")
    notes: str | None = Field(None, description="Lineage, conversions, anything else.")


class ModelCard(_Strict):
    card_version: Literal[1, 2] = Field(CARD_VERSION, description="Format version of this card (1: FAR thresholds only).")
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="Model name (reported by the service).")
    version: str = Field(min_length=1, description="Model version (reported by the service).")
    architecture: str = Field(description="Backbone, e.g. 'iresnet50' or 'dlib_resnet34'.")
    files: Files
    input: InputSpec
    outputs: Outputs = Field(default_factory=Outputs)
    embedding_size: int = Field(gt=0, description="D, the embedding's length.")
    flip_tta: bool = Field(False, description="Add the mirrored face's embedding (engines.base.embed_aligned). "
                           "Magnitudes, quality and thresholds must have been measured the same way.")
    magnitude: Magnitude | None = Field(None, description="MagFace training range; null for non-MagFace models.")
    quality: Quality | None = Field(None, description="Score -> quality mapping, only where calibration validated "
                                    "the source (calibration.quality_checks); null: the model has no quality.")
    quality_head: QualityHead | None = Field(None, description="A learned per-face quality for this model: a "
                                             "candidate source that calibration checks; null: none trained.")
    calibration: Calibration | None = Field(None, description="Verification thresholds; null until measured.")
    training: TrainingInfo | None = Field(None, description="How the weights were trained; null for imported models.")
    accuracy: list[Accuracy] = Field(default_factory=list, description="Measured accuracy.")
    parity: Parity | None = Field(None, description="The export's check of the ONNX against the training framework.")
    licence: str = Field(description="Terms under which the weights may be used and redistributed.")
    provenance: Provenance

    _root: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _version_fields(self) -> ModelCard:
        c = self.calibration
        if self.card_version == 1 and c is not None and (c.open_set or c.quality_bands or c.floors):
            raise ValueError("calibration.open_set, quality_bands and floors need card_version 2")
        if c is not None and self.quality is None and (c.quality_bands or c.floors):
            raise ValueError("calibration.quality_bands and floors need a quality (the card's quality is null)")
        if c is not None and c.quality_checks and self.quality is not None and not any(k.used for k in c.quality_checks):
            raise ValueError("quality is set but no calibration.quality_checks entry validated a source: it must be null")
        if self.quality is not None and self.quality.method == "learned_head" and (
                self.quality_head is None or self.outputs.style is None):
            raise ValueError("quality.method learned_head needs the card's quality_head and its style output")
        return self

    @field_validator("version", mode="before")
    @classmethod
    def _version_text(cls, value):
        # `version: 1` in hand-written YAML is an int; the service reports it as text either way
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    # ---- files ---------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        """The folder the card's paths are relative to."""
        if self._root is None:
            raise ModelCardError(f"card {self.name!r} is not attached to a folder: load it, save it or set_root()")
        return self._root

    def set_root(self, folder: str | Path) -> ModelCard:
        self._root = Path(folder)
        return self

    @property
    def onnx_path(self) -> Path:
        return self.root / self.files.onnx.path

    def verify_files(self) -> None:
        """Check every listed file exists and has its sha256; ModelCardError names the first that does not."""
        head = [("quality_head.onnx", self.quality_head.onnx)] if self.quality_head else []
        for key, entry in [*self.files, *head]:
            path = self.root / entry.path
            if not path.is_file():
                raise ModelCardError(f"{path}: listed in the card as files.{key}, not found")
            found = sha256_file(path)
            if found != entry.sha256:
                raise ModelCardError(f"{path}: sha256 {found} does not match the card's {entry.sha256} (files.{key})")

    # ---- YAML ----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> ModelCard:
        """Read and validate a card (a card.yaml, or the folder holding one); check its files unless verify=False."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILENAME
        data = yaml.safe_load(path.read_text())
        if not isinstance(data, dict):
            raise ModelCardError(f"{path}: a model card is a YAML mapping")
        card = cls.model_validate(data).set_root(path.parent)
        if verify:
            card.verify_files()
        return card

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="python"), sort_keys=False, width=120, allow_unicode=True)

    def save(self, path: str | Path) -> Path:
        """Write the card atomically (temp file, fsync, os.replace); its paths become relative to path's folder."""
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILENAME
        atomic_write_bytes(path, self.to_yaml().encode())
        self.set_root(path.parent)
        return path


# ---- helpers the service uses ------------------------------------------------------------


def quality_from_magnitude(card: ModelCard, norms) -> np.ndarray:
    """Quality in [0, 1] from raw embedding norms: clip((‖f‖ − low)/(high − low), 0, 1)."""
    if card.quality is None:
        raise ModelCardError(f"model {card.name!r} has no quality mapping in its card")
    norms = np.asarray(norms, dtype=np.float64)
    q = card.quality
    return np.clip((norms - q.low) / (q.high - q.low), 0.0, 1.0)


def resolve_far(card: ModelCard, far: float) -> float:
    """The calibrated FAR used for a requested one: itself if calibrated, else the nearest stricter (smaller) one."""
    if not 0 < far < 1:
        raise ModelCardError(f"FAR must be in (0, 1), got {far}")
    if card.calibration is None:
        raise ModelCardError(f"model {card.name!r} has no calibration in its card")
    calibrated = sorted(card.calibration.thresholds)
    for known in calibrated:
        if math.isclose(known, far, rel_tol=1e-9):
            return known
    stricter = [known for known in calibrated if known < far]
    if not stricter:
        raise ModelCardError(f"no calibrated threshold at FAR {far} or stricter for model {card.name!r}; "
                             f"calibrated FARs: {', '.join(f'{f:g}' for f in calibrated)}")
    return stricter[-1]


def threshold_at(card: ModelCard, far: float) -> float:
    """Cosine threshold for FAR `far` (the nearest stricter calibrated FAR when `far` itself is not calibrated)."""
    used = resolve_far(card, far)  # first: it raises the clear error when there is no calibration
    return card.calibration.thresholds[used]


def fpir_at(open_set: OpenSet, threshold: float, n: int) -> float:
    """FPIR(t, N) of the tail model (t below u: at least what the model gives at u)."""
    z = max(threshold - open_set.u, 0.0) / open_set.sigma
    base = 1 + open_set.xi * z
    if base <= 0:  # beyond a bounded tail's end
        return 0.0
    tail = open_set.zeta * (math.exp(-z) if open_set.xi == 0 else base ** (-1 / open_set.xi))
    return -math.expm1(comparisons(open_set, n) * math.log1p(-tail))


def comparisons(open_set: OpenSet, n: int) -> float:
    """k(N): how many independent comparisons a search of n identities amounts to (never more than n)."""
    n = max(n, 1)
    return min(float(n), open_set.theta * n ** open_set.exponent)


def fpir_threshold(card: ModelCard, fpir: float, n: int, open_set: OpenSet | None = None) -> float:
    """Cosine threshold at which a search in a gallery of n identities identifies a stranger with probability fpir,
    by the card's FPIR model or `open_set` (the card's moved to a gallery: engines.open_set.adapt_to_gallery)."""
    open_set = open_set or (card.calibration.open_set if card.calibration else None)
    if open_set is None:
        raise ModelCardError(f"model {card.name!r} has no FPIR calibration in its card (card version "
                             f"{card.card_version}); decide by FAR")
    low, high = open_set.fpir_range
    if not low <= fpir <= high:
        raise ModelCardError(f"FPIR {fpir:g} is outside the calibrated range [{low:g}, {high:g}] of model {card.name!r}")
    return tail_threshold(open_set, fpir, n)


def tail_threshold(open_set: OpenSet, fpir: float, n: int) -> float:
    """The tail model's inverse: t with FPIR(t, n) = fpir (u where that lies below the tail's start)."""
    p = -math.expm1(math.log1p(-fpir) / comparisons(open_set, n))  # per comparison: 1 − (1 − fpir)^(1/k(N))
    if p >= open_set.zeta:  # below the tail's start the model does not apply: u is the stricter, safe choice
        return open_set.u
    xi, sigma = open_set.xi, open_set.sigma
    ratio = p / open_set.zeta
    return open_set.u + (-sigma * math.log(ratio) if xi == 0 else sigma / xi * (ratio ** -xi - 1))


def quality_band(card: ModelCard, quality: float) -> QualityBand | None:
    """The card's band holding a pair's lower quality (None without bands)."""
    bands = card.calibration.quality_bands if card.calibration else []
    for band in bands:
        if band.low <= quality < band.high:
            return band
    return bands[-1] if bands and quality >= bands[-1].high else None


# ---- files -------------------------------------------------------------------------------


def deep_merge(base: dict, overrides: dict) -> dict:
    """base updated by overrides, recursively for nested mappings (an override of None sets None): card
    fields a caller states on top of the ones read off a model."""
    merged = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged
