"""Dependencies routes declare once as `Annotated` types."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.errors import Overloaded, Unavailable
from service.faces import FaceService
from service.gallery import GalleryService
from service.settings import Settings
from service.templates import TemplateService


def _faces(request: Request) -> FaceService:
    return request.app.state.faces


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _templates(request: Request) -> TemplateService:
    templates = request.app.state.templates
    if templates is None:
        raise Unavailable(f"templates are off: {request.app.state.templates_off}")
    return templates


def _gallery(request: Request) -> GalleryService:
    return request.app.state.gallery


Faces = Annotated[FaceService, Depends(_faces)]
Gallery = Annotated[GalleryService, Depends(_gallery)]
Templates = Annotated[TemplateService, Depends(_templates)]
AppSettings = Annotated[Settings, Depends(_settings)]


async def _admit(request: Request):
    """Admission control: beyond max_concurrent_requests a face request is refused (429), not queued."""
    state = request.app.state
    if state.active_requests >= state.settings.max_concurrent_requests:
        raise Overloaded(f"{state.active_requests} requests in progress; retry shortly")
    state.active_requests += 1
    try:
        yield
    finally:
        state.active_requests -= 1


Admitted = Depends(_admit)
