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
