"""Request and response bodies: the HTTP contract of ../shared/ROADMAP.md, published as OpenAPI."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- requests (JSON forms; the multipart forms carry the same fields as files) ----------


class ImageData(_Strict):
    data: str = Field(description="The image file (JPEG, PNG or WebP), base64; a data: URL prefix is allowed.")


class EmbedRequest(_Strict):
    images: list[ImageData] = Field(min_length=1, description="One or more images; one result per image, in order.")


class VerifySide(_Strict):
    data: str | None = Field(default=None, description="An image, base64 (its largest face is compared).")
    embedding: list[float] | None = Field(default=None, description="An embedding from /embed (any scale).")

    @model_validator(mode="after")
    def _one(self) -> VerifySide:
        if (self.data is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'data' (an image) or 'embedding'")
        return self


class VerifyRequest(_Strict):
    a: VerifySide
    b: VerifySide
    far: float | None = Field(default=None, gt=0, lt=1, description="False accept rate (default: the service's).")


class FrameData(_Strict):
    data: str | None = Field(default=None, description="An image, base64 (its largest face is the frame).")
    embedding: list[float] | None = Field(default=None, description="Or a precomputed embedding of the served model "
                                          "(raw, or unit with `magnitude`)...")
    magnitude: float | None = Field(default=None, description="...its MagFace magnitude, if `embedding` is unit-norm...")
    style: list[float] | None = Field(default=None, description="...and its style statistics (/embed?include_style=true).")
    frame_id: str | None = Field(default=None, min_length=1, max_length=128,
                                 description="The client's id of the frame: a repeated id is not counted twice.")

    @model_validator(mode="after")
    def _one(self) -> FrameData:
        if (self.data is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'data' (an image) or 'embedding' (with 'style')")
        if self.embedding is not None and self.style is None:
            raise ValueError("a precomputed 'embedding' needs its 'style' statistics")
        return self


class FramesRequest(_Strict):
    frames: list[FrameData] = Field(min_length=1)


class GalleryEnrolRequest(_Strict):
    images: list[ImageData] | None = Field(default=None, min_length=1, description="Photos of the identity "
                                           "(their largest faces, fused with CAFace where it runs)")
    embedding: list[float] | None = Field(default=None, description="Or an embedding of the served model")
    template_id: str | None = Field(default=None, description="Or a CAFace template's fused embedding")

    @model_validator(mode="after")
    def _one(self) -> GalleryEnrolRequest:
        if sum(v is not None for v in (self.images, self.embedding, self.template_id)) != 1:
            raise ValueError("give exactly one of 'images', 'embedding' or 'template_id'")
        return self


class GallerySearchRequest(_Strict):
    images: list[ImageData] | None = Field(default=None, min_length=1, description="Queries: the largest face of each")
    embedding: list[float] | None = Field(default=None, description="Or one query embedding")
    top_k: int | None = Field(default=None, ge=1, le=1000)
    far: float | None = Field(default=None, gt=0, lt=1)

    @model_validator(mode="after")
    def _one(self) -> GallerySearchRequest:
        if (self.images is None) == (self.embedding is None):
            raise ValueError("give exactly one of 'images' or 'embedding'")
        return self


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


class Enrolled(BaseModel):
    id: str
    gallery: str
    count: int = Field(description="Identities in the gallery after this enrolment")


class Match(BaseModel):
    id: str
    similarity: float


class SearchResultOut(BaseModel):
    matches: list[Match] = Field(description="Best first; empty for an image without a face")
    identified: str | None = Field(description="The best match when its similarity reaches the threshold")
    threshold: float = Field(description="The model card's calibrated threshold at the requested FAR")


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
