"""POST /embed and POST /verify."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query

from service.auth import Authenticated
from service.deps import Admitted, AppSettings, Faces
from service.faces import EmbedOptions, SideResult, StyledFace
from service.inputs import FORM, JSON, MULTIPART, RequestBody
from service.routes.openapi import body
from service.schemas import (
    EmbedRequest,
    EmbedResponse,
    FaceOut,
    ImageResult,
    ModelInfo,
    Problem,
    SideInfo,
    VerifyRequest,
    VerifyResponse,
)

router = APIRouter(dependencies=[Authenticated, Admitted], responses={
    s: {"model": Problem} for s in (400, 401, 413, 415, 422, 429, 503)})

EMBED = RequestBody(EmbedRequest, files={"images": True})
# url-encoded as well, for two embeddings; a side sent as text holds a JSON embedding
VERIFY = RequestBody(VerifyRequest, files={"a": False, "b": False}, text={"far": "False accept rate"}, query=("far",),
                     counted=None, max_files=2, encodings=(MULTIPART, JSON, FORM))


@router.post("/embed", response_model=EmbedResponse, response_model_exclude_unset=True,  # style only when asked
             summary="Detect, align and embed every face of each image", openapi_extra=body(EMBED))
async def embed(
    request: Annotated[EmbedRequest, Depends(EMBED)], faces: Faces, settings: AppSettings,
    max_faces: Annotated[int | None, Query(ge=1, description="Most faces per image, largest first")] = None,
    min_face_size: Annotated[float | None, Query(ge=0, description="Smallest face side in pixels")] = None,
    min_quality: Annotated[float, Query(ge=0, le=1, description="Leave out faces of lower quality (422 for a "
                                                        "model whose card has no validated quality)")] = 0.0,
    include_style: Annotated[bool, Query(description="Add each face's CAFace style statistics (to send frames "
                                                     "as embeddings to /templates)")] = False,
) -> EmbedResponse:
    options = EmbedOptions(max_faces or settings.max_faces,
                           settings.min_face_size if min_face_size is None else min_face_size, min_quality)
    results = await faces.embed_images([image.data for image in request.images], options)
    return EmbedResponse(model=model_info(faces),
                         results=[ImageResult(faces=[face_out(f, include_style) for f in fs]) for fs in results])


@router.post("/verify", response_model=VerifyResponse, summary="Are two faces (images or embeddings) the same person?",
             openapi_extra=body(VERIFY))
async def verify(request: Annotated[VerifyRequest, Depends(VERIFY)], faces: Faces,
                 settings: AppSettings) -> VerifyResponse:
    far = settings.default_far if request.far is None else request.far
    verdict = await faces.verify(request.a, request.b, far)
    return VerifyResponse(similarity=verdict.similarity, match=verdict.match, threshold=verdict.threshold,
                          far=verdict.far, band=verdict.band and list(verdict.band), a=side_info(verdict.a),
                          b=side_info(verdict.b))


def model_info(faces) -> ModelInfo:
    card = faces.card
    return ModelInfo(name=card.name, version=card.version, embedding_size=card.embedding_size)


def face_out(styled: StyledFace, include_style: bool = False) -> FaceOut:
    face = styled.face
    extra = {"style": None if styled.style is None else styled.style.tolist()} if include_style else {}
    return FaceOut(bbox=list(face.bbox), landmarks=face.landmarks.tolist(), detection_score=face.detection_score,
                   embedding=face.embedding.tolist(), magnitude=face.magnitude, quality=face.quality, **extra)


def side_info(side: SideResult) -> SideInfo:
    if side.face is None:
        return SideInfo(source="embedding")
    return SideInfo(source="image", bbox=list(side.face.bbox), quality=side.face.quality, faces_found=side.faces_found)
