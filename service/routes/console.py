"""GET /: the web console, plain HTML, CSS and ES modules from service/static served by the service itself: no
build step, nothing from a CDN (the page's Content-Security-Policy allows only this origin).

The page and its files are open without an API key, like /healthz: the page asks for the key once, keeps it in
the tab's sessionStorage and sends it as X-API-Key with every API call. Every URL the page uses is relative, so
it also works under a reverse proxy's path prefix.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"
PREFIX = "/console"
# blob: for the photos the page shows (object URLs); mediastream: for the webcam preview
CSP = ("default-src 'self'; img-src 'self' blob: data:; media-src 'self' blob: mediastream:; "
       "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'none'")


def install(app: FastAPI) -> None:
    app.mount(PREFIX, StaticFiles(directory=STATIC), name="console")

    @app.get("/", include_in_schema=False)
    async def console() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP,
                                                            "Cache-Control": "no-cache"})
