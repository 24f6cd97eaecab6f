"""Pure-ASGI middleware: the request-body limit (413) and the request-latency histogram."""

from __future__ import annotations

import asyncio
import contextlib
import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import ServerMetrics

BODYLESS = {"GET", "HEAD", "OPTIONS", "DELETE"}
DRAIN_BYTES = 64 << 20  # default: the most a refused body is read (and discarded) before its 413
DRAIN_SECONDS = 60.0  # the longest a refused body is read


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


class BodyLimit:
    """Reads the body of every request up front; more than ``max_bytes`` -> 413.

    A body over the limit is read to its end and thrown away before the 413 goes out, up to
    ``drain_bytes`` in all and ``DRAIN_SECONDS``: a client that writes the whole body before it
    reads the answer (urllib, httpx, requests and most other libraries) then gets the 413 instead
    of a connection reset, and memory stays at the server's read buffer (nothing is kept). A body
    declared larger than ``drain_bytes``, or not finished within those bounds, is answered at
    once with ``Connection: close``; so is one whose client waits for ``100 Continue`` (it has
    not sent the body).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, drain_bytes: int = DRAIN_BYTES):
        self.app = app
        self.max_bytes = max_bytes
        self.drain_bytes = drain_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS:
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _error(400, "bad_content_length", "Content-Length is not an integer")(
                    scope, receive, send
                )
            if declared > self.max_bytes:
                waiting = headers.get(b"expect", b"").lower() == b"100-continue"
                drain = not waiting and declared <= self.drain_bytes
                return await self._too_big(scope, receive, send, drain=drain)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            more = message.get("more_body", False)
            if size > self.max_bytes:
                chunks.clear()
                return await self._too_big(scope, receive, send, more=more, read=size)
            chunks.append(chunk)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_big(
        self, scope: Scope, receive: Receive, send: Send, *, more: bool = True, read: int = 0,
        drain: bool = True,
    ) -> None:
        """The 413; first, when ``drain``, the rest of the body (``more`` of it to come after
        ``read`` bytes) read and discarded within the drain bounds."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                while drain and more and read <= self.drain_bytes:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        return
                    read += len(message.get("body", b""))
                    more = message.get("more_body", False)
        response = _error(413, "body_too_large", f"request body exceeds {self.max_bytes} bytes")
        if more:  # the rest of the body is still coming: this connection cannot be reused
            response.headers["connection"] = "close"
        await response(scope, receive, send)


class RequestMetrics:
    """``padrec_request_duration_seconds{endpoint, status}``; unknown paths are ``unmatched``.

    Also sets ``Server-Timing: app;dur=<ms>`` on every answer: the time from the request's
    arrival in the app to its response headers.
    """

    def __init__(self, app: ASGIApp, metrics: ServerMetrics, endpoints: set[str]):
        self.app = app
        self.metrics = metrics
        self.endpoints = endpoints

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                elapsed_ms = (time.perf_counter() - t0) * 1e3
                headers = [
                    *message.get("headers", []),
                    (b"server-timing", f"app;dur={elapsed_ms:.3f}".encode()),
                ]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope["path"]
            endpoint = path if path in self.endpoints else "unmatched"
            self.metrics.request_seconds.labels(endpoint, str(status)).observe(
                time.perf_counter() - t0
            )
