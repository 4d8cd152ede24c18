"""Every error the service answers with, and its HTTP status: one table, one JSON body.

    {"error": {"code": "no_face", "message": "image a: no face found"}}

Service code raises these domain exceptions; `install` maps them (and FastAPI's own validation
and routing errors) to responses in one place. Messages never echo image bytes or embeddings.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """Base: `code` is the machine-readable name clients switch on; the status comes from STATUS."""

    code = "internal_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    code = "bad_request"


class InvalidInput(ServiceError):
    code = "invalid_input"


class Unauthorized(ServiceError):
    code = "unauthorized"


class NotFound(ServiceError):
    code = "not_found"


class Conflict(ServiceError):
    code = "conflict"


class PayloadTooLarge(ServiceError):
    code = "payload_too_large"


class UnsupportedMediaType(ServiceError):
    code = "unsupported_media_type"


class UndecodableImage(ServiceError):
    code = "undecodable_image"


class ImageTooLarge(ServiceError):
    code = "image_too_large"


class NoFace(ServiceError):
    code = "no_face"


class LowQuality(ServiceError):
    """A face below the model card's quality floor where the request needs a reliable one (enrolment)."""

    code = "low_quality"


class Overloaded(ServiceError):
    code = "overloaded"


class Unavailable(ServiceError):
    code = "unavailable"


class RequestTimeout(ServiceError):
    code = "request_timeout"


class ClientClosed(ServiceError):
    """The client hung up before its request was read: its doing, not a server error (nginx's 499)."""

    code = "client_closed"


STATUS: dict[type[ServiceError], int] = {
    BadRequest: 400,
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    PayloadTooLarge: 413,
    UnsupportedMediaType: 415,
    InvalidInput: 422,
    UndecodableImage: 422,
    ImageTooLarge: 422,
    NoFace: 422,
    LowQuality: 422,
    Overloaded: 429,
    Unavailable: 503,
    RequestTimeout: 408,
    ClientClosed: 499,
    ServiceError: 500,
}

# statuses FastAPI/Starlette raise themselves (unknown route, wrong method) -> our codes
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 400: "bad_request", 413: "payload_too_large"}


def status_of(error: ServiceError) -> int:
    for cls in type(error).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def problem(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _answer(request: Request, status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.errors.labels(code).inc()
    return problem(status, code, message, headers)


def install(app: FastAPI) -> None:
    """Route every exception through the table (unexpected ones: 500, logged with their traceback)."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> JSONResponse:
        status = status_of(exc)
        headers = {401: {"WWW-Authenticate": "X-API-Key"}, 429: {"Retry-After": "1"}, 503: {"Retry-After": "5"}}.get(status)
        return _answer(request, status, exc.code, exc.message, headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for err in exc.errors()[:5]:
            where = ".".join(str(p) for p in err.get("loc", ()))
            parts.append(f"{where}: {err.get('msg', 'invalid')}")
        return _answer(request, 422, InvalidInput.code, "; ".join(parts) or "invalid request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _answer(request, exc.status_code, _HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail))

    @app.exception_handler(RedisConnectionError)
    @app.exception_handler(RedisTimeoutError)
    async def _redis_down(request: Request, exc: Exception) -> JSONResponse:
        log.warning("redis unreachable on %s %s: %s", request.method, request.url.path, type(exc).__name__)
        return _answer(request, 503, Unavailable.code, "the template store (Redis) is unreachable; retry later",
                       {"Retry-After": "5"})

    @app.exception_handler(ClientDisconnect)
    async def _client_closed(request: Request, exc: ClientDisconnect) -> JSONResponse:
        # one line, no traceback: a hang-up must be neither a false 5xx alert nor a way to flood the logs
        log.info("client closed the connection during %s %s", request.method, request.url.path)
        return _answer(request, STATUS[ClientClosed], ClientClosed.code, "the client closed the connection")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
        return _answer(request, 500, ServiceError.code, "internal error")
