"""Request and response bodies: the HTTP contract of ../shared/ROADMAP.md, published as OpenAPI.

A request model is the one validation of its request, whatever the encoding: `service.inputs`
reads JSON bodies, multipart forms (files as bytes) and the query parameters the contract has
into the same fields, so every bound lives here. Validation takes a context with the served
model's sizes (`embedding_size`, and `style_size` for template frames).
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    StrictFloat,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)
from pydantic_core import core_schema


@dataclass(frozen=True)
class Embedding:
    """A client's embedding, checked once for every route: the served model's size, finite, not all
    zero. Validated from a JSON list of numbers; kept as its unit vector and its norm (the magnitude
    of a raw embedding)."""

    unit: np.ndarray  # (D,) float64, L2-normalised
    norm: float

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler) -> core_schema.CoreSchema:
        return core_schema.with_info_after_validator_function(cls._validate, handler(list[StrictFloat]))

    @classmethod
    def _validate(cls, values: list[float], info: ValidationInfo) -> Embedding:
        size = info.context["embedding_size"]
        if len(values) != size:
            raise ValueError(f"{len(values)} values; the served model's embeddings have {size}")
        vector = np.asarray(values, dtype=np.float64)
        scale = float(np.abs(vector).max())
        if scale == 0:
            raise ValueError("an embedding must not be all zeros")
        unit = vector / scale
        norm = scale * float(np.linalg.norm(unit))  # scaled first: ‖v‖² of large values would overflow
        if not np.isfinite(norm):
            raise ValueError("the embedding's norm overflows")
        return cls(unit / np.linalg.norm(unit), norm)


def _image_bytes(value: str | bytes) -> bytes:
    """JSON sends base64 text (a data: URL prefix is allowed); a multipart form sends the file's bytes."""
    if isinstance(value, str):
        try:
            value = base64.b64decode(value.partition(",")[2] if value.startswith("data:") else value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("not valid base64") from None
    if not value:
        raise ValueError("empty image")
    return value


ImageBytes = Annotated[str | bytes, AfterValidator(_image_bytes), WithJsonSchema(
    {"type": "string", "contentEncoding": "base64",
     "description": "The image file (JPEG, PNG or WebP), base64; a data: URL prefix is allowed."})]
Far = Annotated[float | None, Field(default=None, gt=0, lt=1, description="False accept rate whose calibrated "
                                    "threshold decides (default: the service's)")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class _OneOf(_Strict):
    """A body that takes exactly one of the fields named in `one_of`."""

    one_of: ClassVar[tuple[str, ...]]

    @model_validator(mode="after")
    def _exactly_one(self):
        if sum(getattr(self, name) is not None for name in self.one_of) != 1:
            raise ValueError(f"give exactly one of {' or '.join(repr(n) for n in self.one_of)}")
        return self


# ---- requests ------------------------------------------------------------------------------


class ImageData(_Strict):
    data: ImageBytes


class EmbedRequest(_Strict):
    images: list[ImageData] = Field(min_length=1, description="One or more images; one result per image, in order.")


class VerifySide(_OneOf):
    one_of: ClassVar = ("data", "embedding")
    data: ImageBytes | None = Field(default=None, description="An image (its largest face is compared).")
    embedding: Embedding | None = Field(default=None, description="An embedding from /embed (any scale).")


class VerifyRequest(_Strict):
    a: VerifySide
    b: VerifySide
    far: Far


class FrameData(_OneOf):
    one_of: ClassVar = ("data", "embedding")
    data: ImageBytes | None = Field(default=None, description="An image (its largest face is the frame).")
    embedding: Embedding | None = Field(default=None, description="Or a precomputed embedding of the served model "
                                        "(raw, or unit with `magnitude`)...")
    magnitude: float | None = Field(default=None, gt=0, description="...its MagFace magnitude, if `embedding` "
                                    "is unit-norm...")
    style: list[float] | None = Field(default=None, description="...and its style statistics "
                                      "(/embed?include_style=true).")
    frame_id: str | None = Field(default=None, min_length=1, max_length=128,
                                 description="The client's id of the frame: a repeated id is not counted twice.")

    @field_validator("style")
    @classmethod
    def _style_size(cls, style: list[float] | None, info: ValidationInfo) -> list[float] | None:
        size = info.context["style_size"]
        if style is not None and len(style) != size:
            raise ValueError(f"{len(style)} values; the model's style statistics have {size}")
        return style

    @model_validator(mode="after")
    def _style_with_embedding(self) -> FrameData:
        if self.embedding is not None and self.style is None:
            raise ValueError("a precomputed 'embedding' needs its 'style' statistics")
        return self


class FramesRequest(_Strict):
    frames: list[FrameData] = Field(min_length=1)


class GalleryEnrolRequest(_OneOf):
    one_of: ClassVar = ("images", "embedding", "template_id", "frames")
    images: list[ImageData] | None = Field(default=None, min_length=1, description="Photos of the identity "
                                           "(their largest faces, fused with CAFace where it runs)")
    embedding: Embedding | None = Field(default=None, description="Or an embedding of the served model (it cannot "
                                        "be fused with other photos: not with mode=add)")
    template_id: str | None = Field(default=None, description="Or a CAFace template (its memory: all its frames)")
    frames: list[FrameData] | None = Field(default=None, min_length=1, description="Or precomputed embeddings "
                                           "with their style statistics (photos go in 'images'; no frame_id)")
    mode: Literal["replace", "add"] = Field(default="replace", description="replace: the identity is these photos; "
                                            "add: these and every photo it was given before (CAFace)")
    force: bool = Field(default=False, description="Enrol photos whose best face is below the model card's "
                        "enrolment quality floor (otherwise 422 low_quality)")

    @field_validator("frames")
    @classmethod
    def _precomputed(cls, frames: list[FrameData] | None) -> list[FrameData] | None:
        for i, f in enumerate(frames or []):
            if f.data is not None or f.frame_id is not None:
                raise ValueError(f"frames[{i}]: send photos in 'images'; the gallery keeps no frame ids")
        return frames


class GalleryNegativesRequest(_OneOf):
    one_of: ClassVar = ("images", "embeddings")
    images: list[ImageData] | None = Field(default=None, min_length=1, description="Photos of people wrongly "
                                           "identified as this identity (their largest faces)")
    embeddings: list[Embedding] | None = Field(default=None, min_length=1, description="Or their embeddings")


class GallerySearchRequest(_OneOf):
    one_of: ClassVar = ("images", "embedding")
    images: list[ImageData] | None = Field(default=None, min_length=1, description="Queries: the largest face of each")
    embedding: Embedding | None = Field(default=None, description="Or one query embedding")
    top_k: int | None = Field(default=None, ge=1, le=1000, description="Matches per query (default 5)")
    far: Far
    fpir: float | None = Field(default=None, gt=0, lt=1, description="False positive identification rate: the share "
                               "of people not enrolled who may be identified as someone, at the gallery's size "
                               "(default: the service's; within the model card's calibrated range)")

    @model_validator(mode="after")
    def _one_criterion(self):
        if self.far is not None and self.fpir is not None:
            raise ValueError("give at most one of 'far' (a 1:1 threshold) or 'fpir'")
        return self


# the request models: routes read them through `service.inputs.RequestBody`, not FastAPI, so the
# OpenAPI document gets them from here (`service.routes.openapi`)
REQUESTS: tuple[type[BaseModel], ...] = (EmbedRequest, VerifyRequest, FramesRequest, GalleryEnrolRequest,
                                         GallerySearchRequest, GalleryNegativesRequest)


# ---- responses --------------------------------------------------------------------------


class ModelInfo(BaseModel):
    name: str
    version: str
    embedding_size: int


class FaceOut(BaseModel):
    bbox: list[float] = Field(description="[x1, y1, x2, y2] in pixels of the (EXIF-upright) image")
    landmarks: list[list[float]] = Field(description="5 × [x, y]: left eye, right eye, nose, left/right mouth corner")
    detection_score: float
    embedding: list[float] = Field(description="L2-normalised")
    magnitude: float = Field(description="‖f‖ of the raw embedding (MagFace: grows with face quality)")
    quality: float | None = Field(description="Magnitude mapped to [0, 1] through the model card")
    style: list[float] | None = Field(default=None, description="CAFace style statistics (with include_style=true)")


class ImageResult(BaseModel):
    faces: list[FaceOut] = Field(description="Largest first; empty when no face was found")


class EmbedResponse(BaseModel):
    model: ModelInfo
    results: list[ImageResult]


class SideInfo(BaseModel):
    source: Literal["image", "embedding"]
    bbox: list[float] | None = None
    quality: float | None = None
    faces_found: int | None = Field(default=None, description="Faces in the image (the largest is compared)")


class VerifyResponse(BaseModel):
    similarity: float = Field(description="Cosine similarity of the two embeddings")
    match: bool = Field(description="similarity ≥ threshold")
    threshold: float = Field(description="The model card's calibrated cosine threshold at `far`")
    far: float = Field(description="The calibrated false accept rate used (the requested one, or the nearest stricter)")
    band: list[float] | None = Field(default=None, description="[low, high) of the pair's lower quality whose "
                                     "calibrated threshold decided; null: the overall threshold (a side given as "
                                     "an embedding, or a card without quality bands)")
    a: SideInfo
    b: SideInfo


class RejectedFrame(BaseModel):
    index: int = Field(description="Position of the frame in the request")
    reason: str = Field(description="no_face, low_quality, duplicate_frame_id, undecodable_image, "
                                    "unsupported_media_type or image_too_large")


class FramesResponse(BaseModel):
    id: str
    frames: int = Field(description="Frames in the template's memory after this call")
    accepted: int = Field(description="Frames of this call added to the memory")
    rejected: list[RejectedFrame]
    quality: float | None = Field(description="The fused template's quality (null while it has no frames)")


class TemplateResponse(BaseModel):
    id: str
    frames: int
    quality: float
    embedding: list[float] | None = Field(description="The fused template, L2-normalised (null with ?embedding=false)")


class Deleted(BaseModel):
    id: str
    deleted: bool


Fusion = Annotated[Literal["caface", "mean"], Field(
    description="How the identity's photos were fused: caface (the CAFace fusion model, over every photo, "
                "frame or template it was given) or mean (the mean of the photos' unit embeddings, where fusion "
                "is off or the model has no style output; a single embedding is itself)")]


class Enrolled(BaseModel):
    id: str
    gallery: str
    count: int = Field(description="Identities in the gallery after this enrolment")
    photos: int = Field(description="Photos the identity is fused from (with mode=add, all it was ever given)")
    quality: float | None = Field(description="The identity's quality in [0, 1] (CAFace: the evidence of all its "
                                  "photos; else their mean MagFace quality); null for a bare embedding")
    fusion: Fusion


class IdentityOut(BaseModel):
    id: str
    gallery: str
    photos: int = Field(description="Photos the identity is fused from")
    quality: float | None = Field(description="As in the enrolment's answer")
    negatives: int = Field(description="Photos or embeddings of other people it must not be identified as")
    memory: bool = Field(description="Whether its CAFace memory is kept, so mode=add can add photos to it")
    fusion: Fusion


class NegativesAdded(BaseModel):
    id: str
    negatives: int = Field(description="The identity's negatives after this request")


class Match(BaseModel):
    id: str
    similarity: float


class SearchResultOut(BaseModel):
    matches: list[Match] = Field(description="Best first; empty for an image without a face")
    identified: str | None = Field(description="The best match when the decision is 'identified'")
    threshold: float = Field(description="The calibrated threshold: at the requested FPIR for this gallery's size, "
                                         "or at the requested FAR")
    decision: Literal["identified", "unknown", "low_quality"] = Field(description="identified: the best match "
                                         "reaches the threshold; unknown: nobody does; low_quality: the probe face "
                                         "is below the card's quality floor (matches still listed)")
    fpir: float | None = Field(description="The threshold's FPIR at this gallery size (null: no open-set calibration)")
    gallery_size: int = Field(description="Identities searched")
    quality: float | None = Field(description="The probe face's quality (null for an embedding query)")
    probe_floor: float | None = Field(description="The card's probe quality floor (low_quality below it); null: "
                                      "quality gating is off for this model (no validated quality, or a card without floors)")
    fpir_calibration: Literal["gallery", "model"] | None = Field(default=None, description="Whose FPIR model set the "
                                      "threshold: gallery (the card's tail moved to this gallery's own identities, "
                                      "FACESET_GALLERY_CALIBRATION_MIN and up), model (the card's hold-out "
                                      "calibration); null: decided by FAR")


class SearchResponse(BaseModel):
    results: list[SearchResultOut]


class GalleryInfo(BaseModel):
    count: int
    index: str


class Check(BaseModel):
    ok: bool
    detail: str


class Readiness(BaseModel):
    ready: bool
    checks: dict[str, Check]


class ErrorBody(BaseModel):
    code: str
    message: str


class Problem(BaseModel):
    error: ErrorBody


class ServedModel(BaseModel):
    """GET /model: what the service runs and the operating points its calibration supports."""

    name: str
    version: str
    architecture: str
    runtime: str = Field(description="The runtime serving it (onnxruntime, tensorrt)")
    embedding_size: int
    input_size: int = Field(description="Side of the aligned face crop in pixels")
    flip_tta: bool
    quality: bool = Field(description="Whether the card has a validated quality (false: nothing is gated on it)")
    fars: list[float] = Field(description="Calibrated false accept rates, ascending: /verify's far takes these "
                              "(another value uses the nearest stricter one)")
    default_far: float = Field(description="The FAR /verify uses when the request names none")
    fpir_range: list[float] | None = Field(description="[lowest, highest] FPIR /gallery/search takes (null: no "
                                           "open-set calibration; searches decide by FAR)")
    default_fpir: float | None = Field(description="The FPIR a search uses when the request names neither")
    probe_floor: float | None = Field(description="Searches with a probe below this quality answer low_quality")
    enrolment_floor: float | None = Field(description="Enrolments whose best photo is below this are refused")
    min_face_size: float = Field(description="Faces with a shorter box side (px) are left out unless a request "
                                 "sets min_face_size")
    calibration_data: str | None = Field(description="What the thresholds were measured on")
    templates: str | None = Field(description="Why /templates is off (null: it is on)")
