"""1:N identification: POST /gallery/search, POST, GET and DELETE /gallery/{id}, POST /gallery/{id}/negatives,
GET /gallery.

The gallery is the `X-Gallery` header's (default "default"). "search" is reserved: it cannot be an id.
"""
from __future__ import annotations

import math
from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path

from service.auth import Authenticated
from service.deps import Admitted, AppSettings, Gallery
from service.errors import InvalidInput
from service.gallery import fusion_used
from service.inputs import RequestBody, frames
from service.routes.openapi import body
from service.schemas import (
    Deleted,
    Enrolled,
    GalleryEnrolRequest,
    GalleryInfo,
    GalleryNegativesRequest,
    GallerySearchRequest,
    IdentityOut,
    Match,
    NegativesAdded,
    Problem,
    SearchResponse,
    SearchResultOut,
)

router = APIRouter(prefix="/gallery", tags=["gallery"], dependencies=[Authenticated, Admitted],
                   responses={s: {"model": Problem} for s in (400, 401, 404, 413, 415, 422, 429, 503)})

ID = r"^[A-Za-z0-9._:@-]{1,128}$"
GalleryName = Annotated[str, Header(alias="X-Gallery", pattern=ID, description="The gallery (default: default)")]
IdentityId = Annotated[str, Path(pattern=ID, description="The identity's id")]
SEARCH = RequestBody(GallerySearchRequest, files={"images": True}, text={"top_k": "Matches per query",
                                                                         "far": "False accept rate",
                                                                         "fpir": "False positive identification rate"},
                     query=("top_k", "far", "fpir"))
ENROL = RequestBody(GalleryEnrolRequest, files={"images": True},
                    text={"mode": "replace or add", "force": "Enrol below the quality floor"}, query=("mode", "force"))
NEGATIVES = RequestBody(GalleryNegativesRequest, files={"images": True})


@router.post("/search", response_model=SearchResponse, summary="Who is this? One result per query",
             openapi_extra=body(SEARCH))
async def search(request: Annotated[GallerySearchRequest, Depends(SEARCH)], gallery: Gallery, settings: AppSettings,
                 x_gallery: GalleryName = "default") -> SearchResponse:
    probes = (await gallery.query_faces([i.data for i in request.images]) if request.images
              else [(request.embedding.unit, None)])
    results = await gallery.search(x_gallery, [p and p[0] for p in probes], request.top_k or 5, request.far,
                                   request.fpir, (settings.default_far, settings.default_fpir),
                                   [p and p[1] for p in probes])
    return SearchResponse(results=[SearchResultOut(
        matches=[Match(id=i, similarity=s) for i, s in r.matches], identified=r.identified, threshold=r.threshold,
        decision=r.decision, fpir=r.fpir, gallery_size=r.gallery_size, quality=r.quality,
        probe_floor=r.probe_floor, fpir_calibration=r.fpir_calibration) for r in results])


@router.post("/{identity}", response_model=Enrolled, summary="Enrol an identity (replace it, or ?mode=add photos)",
             openapi_extra=body(ENROL))
async def enrol(identity: IdentityId, request: Annotated[GalleryEnrolRequest, Depends(ENROL)], gallery: Gallery,
                x_gallery: GalleryName = "default") -> Enrolled:
    if identity == "search":
        raise InvalidInput("'search' is reserved (POST /gallery/search); choose another id")
    images = [i.data for i in request.images] if request.images else None
    count, photos = await gallery.enrol(x_gallery, identity, images, request.embedding, request.template_id,
                                        frames(request) if request.frames else None, add=request.mode == "add",
                                        force=request.force)
    return Enrolled(id=identity, gallery=x_gallery, count=count, photos=photos.count, quality=_finite(photos.quality),
                    fusion=fusion_used(photos))


@router.get("/{identity}", response_model=IdentityOut, summary="What an identity is fused from")
async def identity_info(identity: IdentityId, gallery: Gallery, x_gallery: GalleryName = "default") -> IdentityOut:
    photos, negatives = await gallery.identity(x_gallery, identity)
    return IdentityOut(id=identity, gallery=x_gallery, photos=photos.count, quality=_finite(photos.quality),
                       negatives=negatives, memory=photos.memory is not None, fusion=fusion_used(photos))


@router.post("/{identity}/negatives", response_model=NegativesAdded, summary="Not this person: never identify "
             "these faces, or faces closer to them than to the identity, as it", openapi_extra=body(NEGATIVES))
async def add_negatives(identity: IdentityId, request: Annotated[GalleryNegativesRequest, Depends(NEGATIVES)],
                        gallery: Gallery, x_gallery: GalleryName = "default") -> NegativesAdded:
    images = [i.data for i in request.images] if request.images else None
    count = await gallery.add_negatives(x_gallery, identity, images, request.embeddings)
    return NegativesAdded(id=identity, negatives=count)


def _finite(quality: float) -> float | None:
    """nan (unknown, e.g. a bare embedding) is null in JSON"""
    return quality if math.isfinite(quality) else None


@router.delete("/{identity}", response_model=Deleted, summary="Erase an identity from the gallery")
async def delete(identity: IdentityId, gallery: Gallery, x_gallery: GalleryName = "default") -> Deleted:
    await gallery.delete(x_gallery, identity)
    return Deleted(id=identity, deleted=True)


@router.get("", response_model=GalleryInfo, summary="The gallery's size and index")
async def info(gallery: Gallery, x_gallery: GalleryName = "default") -> GalleryInfo:
    count, index = await gallery.info(x_gallery)
    return GalleryInfo(count=count, index=index)
