"""1:N identification: POST /gallery/search, POST and DELETE /gallery/{id}, GET /gallery.

The gallery is the `X-Gallery` header's (default "default"). "search" is reserved: it cannot be an id.
"""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Request

from service.auth import Authenticated
from service.deps import Admitted, AppSettings, Gallery
from service.errors import InvalidInput
from service.inputs import read_gallery
from service.routes.openapi import body, fields
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


@router.post("/search", response_model=SearchResponse, summary="Who is this? One result per query",
             openapi_extra=body(GallerySearchRequest, fields({"images": True}, {"top_k": "matches per query",
                                                                                "far": "false accept rate"})))
async def search(
    request: Request, gallery: Gallery, settings: AppSettings,
    top_k: Annotated[int | None, Query(ge=1, le=1000, description="Matches per query (default 5)")] = None,
    far: Annotated[float | None, Query(gt=0, lt=1, description="FAR whose threshold identifies")] = None,
    x_gallery: GalleryName = "default",
) -> SearchResponse:
    query = await read_gallery(request, settings.max_images, search=True)
    queries = (await gallery.query_embeddings(query.images) if query.images
               else [gallery.query_embedding(query.embedding)])
    results = await gallery.search(x_gallery, queries, query.top_k or top_k or 5,
                                   query.far or far or settings.default_far)
    return SearchResponse(results=[SearchResultOut(matches=[Match(id=i, similarity=s) for i, s in r.matches],
                                                   identified=r.identified, threshold=r.threshold) for r in results])


@router.post("/{identity}", response_model=Enrolled, summary="Enrol (or replace) an identity",
             openapi_extra=body(GalleryEnrolRequest, fields({"images": True})))
async def enrol(identity: IdentityId, request: Request, gallery: Gallery, settings: AppSettings,
                x_gallery: GalleryName = "default") -> Enrolled:
    if identity == "search":
        raise InvalidInput("'search' is reserved (POST /gallery/search); choose another id")
    item = await read_gallery(request, settings.max_images, search=False)
    count = await gallery.enrol(x_gallery, identity, item.images, item.embedding, item.template_id)
    return Enrolled(id=identity, gallery=x_gallery, count=count)


@router.delete("/{identity}", response_model=Deleted, summary="Erase an identity from the gallery")
async def delete(identity: IdentityId, gallery: Gallery, x_gallery: GalleryName = "default") -> Deleted:
    await gallery.delete(x_gallery, identity)
    return Deleted(id=identity, deleted=True)


@router.get("", response_model=GalleryInfo, summary="The gallery's size and index")
async def info(gallery: Gallery, x_gallery: GalleryName = "default") -> GalleryInfo:
    count, index = await gallery.info(x_gallery)
    return GalleryInfo(count=count, index=index)
