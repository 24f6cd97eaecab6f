"""Error answers: every error is ``{"error": code, "message": ..., "detail": ...}`` (docs/SERVER.md,
"Bad input and overload"). ``install(app)`` registers the handlers; ``ERRORS`` documents them in
the OpenAPI schema of the recommendation routes."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from padrec_vllm.engines import EngineError
from server.recommender import UnknownItems
from server.schemas import ErrorBody
from server.state import Unavailable

log = logging.getLogger("padrec.server")

ERRORS = {
    400: {"model": ErrorBody, "description": "malformed JSON or header"},
    413: {"model": ErrorBody, "description": "body larger than the limit"},
    422: {"model": ErrorBody, "description": "invalid field, or unknown item ids"},
    503: {
        "model": ErrorBody,
        "description": "not ready, engine failure, or overload (Retry-After)",
    },
}


def install(app: FastAPI) -> None:
    """Register the handlers below on ``app`` (whose ``state.server`` holds the settings)."""
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(UnknownItems, on_unknown_items)
    app.add_exception_handler(Unavailable, on_unavailable)
    app.add_exception_handler(EngineError, on_engine_error)
    app.add_exception_handler(StarletteHTTPException, on_http)


async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
    """400 ``malformed_json`` with the position; else 422 ``invalid_request`` naming each field."""
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        pos = next((e["loc"][-1] for e in errors if e.get("type") == "json_invalid"), "?")
        return JSONResponse(
            {"error": "malformed_json", "message": f"body: not valid JSON (at position {pos})"},
            400,
        )
    detail = [{k: v for k, v in e.items() if k in ("loc", "msg", "type")} for e in errors]
    message = "; ".join(f"{_loc(e['loc'])}: {e['msg']}" for e in errors)
    return JSONResponse(
        {"error": "invalid_request", "message": message, "detail": jsonable_encoder(detail)},
        422,
    )


async def on_unknown_items(request: Request, exc: UnknownItems) -> JSONResponse:
    return JSONResponse(
        {
            "error": "unknown_items",
            "message": str(exc),
            "detail": {"field": exc.field, "items": exc.items},
        },
        422,
    )


async def on_unavailable(request: Request, exc: Unavailable) -> JSONResponse:
    return JSONResponse(
        {"error": exc.code, "message": exc.message}, 503, headers=_retry_after(request)
    )


async def on_engine_error(request: Request, exc: EngineError) -> JSONResponse:
    log.error("engine error: %s", exc)
    return JSONResponse(
        {"error": "engine_error", "message": str(exc)}, 503, headers=_retry_after(request)
    )


async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404 / 405 and the like, in the same body shape."""
    return JSONResponse(
        {"error": _http_code(exc.status_code), "message": str(exc.detail)},
        exc.status_code,
        headers=getattr(exc, "headers", None),
    )


def _retry_after(request: Request) -> dict[str, str]:
    return {"Retry-After": str(request.app.state.server.settings.retry_after_s)}


def _loc(loc) -> str:
    """``("body", "requests", 1, "k")`` -> ``body.requests[1].k``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, f"http_{status}")
