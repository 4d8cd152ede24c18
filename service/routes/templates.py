"""CAFace streaming templates: POST /templates/{id}/frames, GET and DELETE /templates/{id}."""
from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query

from service.auth import Authenticated
from service.deps import Admitted, AppSettings, Templates
from service.inputs import RequestBody, frames, frames_form
from service.routes.openapi import body
from service.schemas import (
    Deleted,
    FramesRequest,
    FramesResponse,
    Problem,
    RejectedFrame,
    TemplateResponse,
)

router = APIRouter(prefix="/templates", tags=["templates"], dependencies=[Authenticated, Admitted],
                   responses={s: {"model": Problem} for s in (400, 401, 404, 409, 413, 415, 422, 429, 503)})

TemplateId = Annotated[str, Path(pattern=r"^[A-Za-z0-9._:@-]{1,128}$", description="The identity's template id")]
FRAMES = RequestBody(FramesRequest, files={"images": True}, text={"frame_ids": "One per image, in order"},
                     counted="frames", from_form=frames_form)


@router.post("/{template_id}/frames", response_model=FramesResponse, summary="Stream frames into a template",
             openapi_extra=body(FRAMES))
async def add_frames(
    template_id: TemplateId, templates: Templates, request: Annotated[FramesRequest, Depends(FRAMES)],
    settings: AppSettings,
    min_quality: Annotated[float | None, Query(ge=0, le=1, description="Quality floor (default: the service's); "
                                               "422 for a model whose card has no validated quality")] = None,
) -> FramesResponse:
    out = await templates.add_frames(template_id, frames(request), min_quality, settings.template_min_quality)
    return FramesResponse(id=out.template_id, frames=out.frames, accepted=out.accepted, quality=out.quality,
                          rejected=[RejectedFrame(index=r.index, reason=r.reason) for r in out.rejected])


@router.get("/{template_id}", response_model=TemplateResponse, summary="The fused template")
async def get_template(
    template_id: TemplateId, templates: Templates,
    embedding: Annotated[bool, Query(description="Include the fused embedding (false: frames and quality only)")] = True,
) -> TemplateResponse:
    view = await templates.get(template_id)
    return TemplateResponse(id=view.template_id, frames=view.frames, quality=view.quality,
                            embedding=view.embedding.tolist() if embedding else None)


@router.delete("/{template_id}", response_model=Deleted, summary="Erase a template (every key)")
async def delete_template(template_id: TemplateId, templates: Templates) -> Deleted:
    await templates.delete(template_id)
    return Deleted(id=template_id, deleted=True)
