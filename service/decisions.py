"""Decisions from the model card's calibration: 1:N thresholds by FPIR at the gallery's size, quality floors,
and /verify thresholds by the pair's quality band (`engines.model_card` holds the calibrated numbers).

A model without a validated quality (the card's `quality` is null: engines.calibration found no source whose
rejection of the worst faces lowers errors) gates nothing on quality: no probe floor (no low_quality decisions),
no enrolment floor, one /verify threshold, and a caller's quality floor is refused (`quality_gate`).

A search decides by FPIR (the share of people not enrolled who would be identified as someone) unless the
caller names a FAR (a 1:1 threshold); with neither, the service's default FPIR where the card has the
open-set calibration (card version 2), else its default FAR (version 1 cards).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engines.model_card import (ModelCard, ModelCardError, OpenSet, QualityBand, fpir_at, fpir_threshold, quality_band,
                                resolve_far)
from service.errors import InvalidInput, LowQuality

Decision = Literal["identified", "unknown", "low_quality"]


@dataclass(frozen=True)
class SearchRule:
    threshold: float
    fpir: float | None  # the threshold's FPIR at this gallery size (None without the open-set calibration)
    gallery_size: int
    probe_floor: float | None


def search_rule(card: ModelCard, gallery_size: int, far: float | None, fpir: float | None,
                default_far: float, default_fpir: float, open_set: OpenSet | None = None) -> SearchRule:
    """The threshold of a search in a gallery of `gallery_size` identities, by the card's FPIR model or `open_set`
    (the gallery's own: service.gallery); a 422 naming the supported range."""
    calibration = card.calibration
    open_set = open_set or (calibration.open_set if calibration else None)
    if far is None and fpir is None:
        far, fpir = (None, default_fpir) if open_set else (default_far, None)
    try:
        threshold = (fpir_threshold(card, fpir, gallery_size, open_set) if fpir is not None
                     else far_threshold(card, far)[1])
    except ModelCardError as exc:
        raise InvalidInput(str(exc)) from None
    floors = calibration.floors if calibration else None
    return SearchRule(threshold, fpir_at(open_set, threshold, gallery_size) if open_set else None, gallery_size,
                      floors.probe if floors else None)


def decide(rule: SearchRule, matches: list[tuple[str, float]], quality: float | None) -> tuple[Decision, str | None]:
    """(decision, identity): a probe below the floor is low_quality and identifies no one, whatever it matches."""
    if quality is not None and rule.probe_floor is not None and quality < rule.probe_floor:
        return "low_quality", None
    if matches and matches[0][1] >= rule.threshold:
        return "identified", matches[0][0]
    return "unknown", None


def far_threshold(card: ModelCard, far: float, quality: float | None = None) -> tuple[float, float, QualityBand | None]:
    """(calibrated FAR used, cosine threshold, band): the band's threshold where the card has bands and the pair's
    lower quality is known, else the overall one."""
    used = resolve_far(card, far)
    band = quality_band(card, quality) if quality is not None else None
    if band is not None and used in band.thresholds:
        return used, band.thresholds[used], band
    return used, card.calibration.thresholds[used], None


def check_enrolment(card: ModelCard, qualities: list[float | None], force: bool) -> None:
    """An identity whose best photo is below the enrolment floor is refused (422 low_quality) unless forced."""
    floors = card.calibration.floors if card.calibration else None
    known = [q for q in qualities if q is not None]
    if force or floors is None or not known or max(known) >= floors.enrolment:
        return
    raise LowQuality(f"the best photo's quality {max(known):.3f} is below the enrolment floor {floors.enrolment:.3f} "
                     "(the model card's calibration); send a sharper photo, or force=true to enrol it anyway")


def quality_gate(card: ModelCard, parameter: str) -> None:
    """A 422 naming `parameter` where the caller asks for a quality floor the model cannot apply."""
    if card.quality is None:
        raise InvalidInput(f"{parameter}: quality gating is off for model {card.name!r} (its card has no validated "
                           "quality: calibration found none whose rejection of the worst faces lowers errors), so no "
                           f"face can be gated on it; leave {parameter} out")
