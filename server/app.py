"""The FastAPI app: ``create_app(settings)`` wires settings, state, lifespan, routes, error
handlers and middleware; the parts live in their own modules (state.py, routes.py, errors.py,
middleware.py, checks.py).

Start-up: the lifespan loads the catalog (fast; a bad artifacts directory fails the start), then
starts the engine in a background task, so ``/healthz`` answers at once while the model loads
and warms up; ``/readyz`` and ``/recommend`` answer 503 (with Retry-After) until it is ready.
"""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI

from server import errors, routes
from server.engines import build_engine
from server.metrics import ServerMetrics
from server.middleware import BodyLimit, RequestMetrics
from server.settings import Settings
from server.state import EngineFactory, ServerState


def create_app(
    settings: Settings | None = None, *, engine_factory: EngineFactory = build_engine
) -> FastAPI:
    """The app. ``engine_factory(settings) -> Engine`` is called once, by the lifespan."""
    settings = settings if settings is not None else Settings()
    metrics = ServerMetrics()
    state = ServerState(settings, metrics, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.startup()
        try:
            yield
        finally:
            await state.shutdown()

    app = FastAPI(
        title="padrec-vllm recommendation server",
        version="0.1.0",
        description="Generative list-wise recommendation with PAD-Rec speculative decoding. "
        "See docs/SERVER.md.",
        lifespan=lifespan,
    )
    app.state.server = state
    errors.install(app)
    app.include_router(routes.recommendations)
    app.include_router(routes.operations)
    endpoints = {r.path for r in app.routes}
    app.add_middleware(
        BodyLimit, max_bytes=settings.max_body_bytes, drain_bytes=settings.drain_body_bytes
    )
    app.add_middleware(RequestMetrics, metrics=metrics, endpoints=endpoints)
    return app
