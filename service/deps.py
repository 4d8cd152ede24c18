"""Dependencies routes declare once as `Annotated` types."""
from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.faces import FaceService
from service.settings import Settings


def _faces(request: Request) -> FaceService:
    return request.app.state.faces


def _settings(request: Request) -> Settings:
    return request.app.state.settings


Faces = Annotated[FaceService, Depends(_faces)]
AppSettings = Annotated[Settings, Depends(_settings)]
