"""Pure-ASGI middleware: the request-body limit (413) and the request-latency histogram."""

from __future__ import annotations

import time

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import ServerMetrics

BODYLESS = {"GET", "HEAD", "OPTIONS", "DELETE"}


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=status)


class BodyLimit:
    """Reads the body of every request up front; more than ``max_bytes`` -> 413."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in BODYLESS:
            return await self.app(scope, receive, send)
        too_big = _error(413, "body_too_large", f"request body exceeds {self.max_bytes} bytes")
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                return await _error(400, "bad_content_length", "Content-Length is not an integer")(
                    scope, receive, send
                )
            if declared > self.max_bytes:
                return await too_big(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


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
