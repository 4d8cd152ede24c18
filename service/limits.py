"""Request bodies: bounded in size and in time, read whole before the app (and admission) sees them.

- A declared Content-Length over the limit is answered 413 without buffering a byte; a chunked
  body is counted as it streams and answered 413 the moment it crosses the limit.
- Reading the body has a deadline (408): a client sending 1 byte/s holds a connection, never an
  admission slot, because the request reaches the routes (and `Admitted`) only once its body is in.
- Before a 413 closes the connection the rest of the body is drained (bounded in bytes and time):
  closing on unread data resets the connection, and clients that send their whole body before
  reading (urllib, requests) would see "connection reset" instead of the 413.
- Slow headers: uvicorn (h11) has no header deadline, so `HeaderDeadline` closes a connection
  whose next request's headers are not in within `header_timeout_s`.
"""
from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.errors import STATUS, PayloadTooLarge, RequestTimeout, problem

DRAIN_FACTOR = 4  # drain bodies up to 4× the limit (the innocent over-the-limit upload); close on larger ones
DRAIN_S = 5.0


class RequestBody:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app, self.max_bytes, self.timeout_s = app, max_bytes, timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", ())).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await self._refuse(scope, receive, send, 400, "bad_request", "invalid Content-Length")
            return
        if declared is not None and int(declared) > self.max_bytes:
            message = f"request body of {int(declared)} bytes exceeds the limit of {self.max_bytes}"
            await self._refuse(scope, receive, send, 413, PayloadTooLarge.code, message,
                               drain=int(declared) <= DRAIN_FACTOR * self.max_bytes)
            return
        try:
            first = await asyncio.wait_for(self._read(receive), self.timeout_s)
        except asyncio.TimeoutError:
            await self._refuse(scope, receive, send, STATUS[RequestTimeout], RequestTimeout.code,
                               f"the request body was not received within {self.timeout_s:g} s")
            return
        except PayloadTooLarge as exc:
            await self._refuse(scope, receive, send, 413, exc.code, exc.message, drain=True)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return first

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> Message:
        """The whole body as one message (or the disconnect that cut it short, for the app to see)."""
        chunks, seen, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return message
            chunks.append(message.get("body", b""))
            seen += len(chunks[-1])
            if seen > self.max_bytes:
                raise PayloadTooLarge(f"request body exceeds the limit of {self.max_bytes} bytes")
            more = message.get("more_body", False)
        return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str,
                      drain: bool = False) -> None:
        metrics = getattr(getattr(scope.get("app"), "state", None), "metrics", None)
        if metrics is not None:
            metrics.errors.labels(code).inc()
        response = problem(status, code, message, headers={"Connection": "close"})

        async def held_open(msg: Message) -> None:
            # the answer goes out at once; the connection closes only after the drain
            if msg["type"] == "http.response.body" and not msg.get("more_body", False) and drain:
                await send({**msg, "more_body": True})
                await _drain(receive, DRAIN_FACTOR * self.max_bytes, DRAIN_S)
                msg = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(msg)

        await response(scope, receive, held_open)


async def _drain(receive: Receive, max_bytes: int, timeout_s: float) -> None:
    async def discard() -> None:
        seen, more = 0, True
        while more and seen <= max_bytes:
            message = await receive()
            seen += len(message.get("body", b""))
            more = message["type"] == "http.request" and message.get("more_body", False)

    try:
        await asyncio.wait_for(discard(), timeout_s)
    except asyncio.TimeoutError:
        pass  # bounded: a client still sending after DRAIN_S gets the close it asked for


class HeaderDeadline(H11Protocol):
    """uvicorn's h11 protocol, closing a connection whose request headers take over `header_timeout_s`.

    After a response the connection may first idle for the keep-alive allowance (uvicorn closes it when
    that passes with nothing sent), so the next request's headers are due by keep_alive_s + header_timeout_s.
    """

    header_timeout_s = 10.0
    keep_alive_s = 75.0

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(self.header_timeout_s)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm(self.keep_alive_s + self.header_timeout_s)

    def _arm(self, seconds: float) -> None:
        self.loop.call_later(seconds, self._expire, self.cycle)

    def _expire(self, cycle) -> None:
        # the same cycle as when armed: no new request's headers arrived in time
        if self.cycle is cycle and not self.transport.is_closing():
            self.transport.close()


def server_options(settings) -> dict:
    """uvicorn options the limits need (`faceset serve` and the tests' live servers use the same)."""
    protocol = type("HeaderDeadline", (HeaderDeadline,), {"header_timeout_s": settings.header_timeout_s,
                                                          "keep_alive_s": settings.keep_alive_s})
    return {"http": protocol, "timeout_keep_alive": settings.keep_alive_s}
