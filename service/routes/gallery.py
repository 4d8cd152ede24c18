"""1:N identification: POST /gallery/search, POST and DELETE /gallery/{id}, GET /gallery.

The gallery is the `X-Gallery` header's (default "default"). "search" is reserved: it cannot be an id.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Header, Path

from service.auth import Authenticated
from service.deps import Admitted, AppSettings, Gallery
from service.errors import InvalidInput
from service.inputs import RequestBody
from service.routes.openapi import body
from service.schemas import (
    Deleted,
    Enrolled,
    GalleryEnrolRequest,
    GalleryInfo,
    GallerySearchRequest,
    Match,
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
                                                                         "far": "False accept rate"},
                     query=("top_k", "far"))
ENROL = RequestBody(GalleryEnrolRequest, files={"images": True})


@router.post("/search", response_model=SearchResponse, summary="Who is this? One result per query",
             openapi_extra=body(SEARCH))
async def search(request: Annotated[GallerySearchRequest, Depends(SEARCH)], gallery: Gallery, settings: AppSettings,
                 x_gallery: GalleryName = "default") -> SearchResponse:
    queries = (await gallery.query_embeddings([i.data for i in request.images]) if request.images
               else [request.embedding.unit])
    results = await gallery.search(x_gallery, queries, request.top_k or 5,
                                   settings.default_far if request.far is None else request.far)
    return SearchResponse(results=[SearchResultOut(matches=[Match(id=i, similarity=s) for i, s in r.matches],
                                                   identified=r.identified, threshold=r.threshold) for r in results])


@router.post("/{identity}", response_model=Enrolled, summary="Enrol (or replace) an identity",
             openapi_extra=body(ENROL))
async def enrol(identity: IdentityId, request: Annotated[GalleryEnrolRequest, Depends(ENROL)], gallery: Gallery,
                x_gallery: GalleryName = "default") -> Enrolled:
    if identity == "search":
        raise InvalidInput("'search' is reserved (POST /gallery/search); choose another id")
    images = [i.data for i in request.images] if request.images else None
    count = await gallery.enrol(x_gallery, identity, images, request.embedding, request.template_id)
    return Enrolled(id=identity, gallery=x_gallery, count=count)


@router.delete("/{identity}", response_model=Deleted, summary="Erase an identity from the gallery")
async def delete(identity: IdentityId, gallery: Gallery, x_gallery: GalleryName = "default") -> Deleted:
    await gallery.delete(x_gallery, identity)
    return Deleted(id=identity, deleted=True)


@router.get("", response_model=GalleryInfo, summary="The gallery's size and index")
async def info(gallery: Gallery, x_gallery: GalleryName = "default") -> GalleryInfo:
    count, index = await gallery.info(x_gallery)
    return GalleryInfo(count=count, index=index)
