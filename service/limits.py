"""Request body limit, enforced before the body is buffered.

A declared Content-Length over the limit is answered 413 at once, without reading a byte; a
chunked body is counted as it streams and the read fails with PayloadTooLarge the moment it
crosses the limit (the route's error handler then answers 413). Either way the service never
holds more than the limit of one request in memory.
"""
from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import PayloadTooLarge, problem


class BodySizeLimit:
    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        refusal = self._refuse(declared)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        seen = 0

        async def counted() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            return message

        await self.app(scope, counted, send)

    def _refuse(self, declared: bytes | None):
        if declared is None:
            return None
        if not declared.isdigit():
            return problem(400, "bad_request", "invalid Content-Length", headers={"Connection": "close"})
        if int(declared) > self.max_bytes:
            return problem(413, PayloadTooLarge.code,
                           f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}",
                           headers={"Connection": "close"})
        return None
