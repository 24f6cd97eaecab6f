"""The HTTP routes: recommendations (``/recommend``, ``/recommend/batch``) and operations
(``/healthz``, ``/readyz``, ``/metrics``). Each handler reaches the app's ``ServerState``
through ``Depends(server_state)``; docs/SERVER.md describes the API."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.errors import ERRORS
from server.schemas import (
    BatchRequest,
    BatchResponse,
    Health,
    Readiness,
    RecommendRequest,
    RecommendResponse,
)
from server.state import ServerState


def server_state(request: Request) -> ServerState:
    return request.app.state.server


State = Annotated[ServerState, Depends(server_state)]

recommendations = APIRouter()
operations = APIRouter()


@recommendations.post(
    "/recommend",
    response_model=RecommendResponse,
    responses=ERRORS,
    summary="Recommend k items for one user history",
)
async def recommend(body: RecommendRequest, state: State) -> RecommendResponse:
    t0 = time.perf_counter()
    with state.admitted(1):
        plan = state.recommender.plan(body)
        return await state.recommend(plan, t0)


@recommendations.post(
    "/recommend/batch",
    response_model=BatchResponse,
    responses=ERRORS,
    summary="Several recommendation requests, answered in order",
)
async def recommend_batch(body: BatchRequest, state: State) -> BatchResponse:
    t0 = time.perf_counter()
    n, limit = len(body.requests), state.settings.max_batch_requests
    if n > limit:
        raise RequestValidationError(
            [
                {
                    "loc": ("body", "requests"),
                    "type": "too_long",
                    "msg": f"at most {limit} requests per batch, got {n}",
                }
            ]
        )
    with state.admitted(n):
        plans = [
            state.recommender.plan(r, f"requests[{i}].history") for i, r in enumerate(body.requests)
        ]
        responses = await asyncio.gather(*(state.recommend(p, t0) for p in plans))
        return BatchResponse(responses=list(responses))


@operations.get(
    "/healthz",
    response_model=Health,
    responses={503: {"model": Health}},
    summary="Process alive (503 once the engine has failed)",
)
async def healthz(state: State):
    state.check_alive()
    if state.status == "failed":
        return JSONResponse({"status": "failed"}, 503)
    return Health(status="ok")


@operations.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Engine loaded and warmed up",
)
async def readyz(state: State):
    state.check_alive()
    body = state.readiness()
    return JSONResponse(jsonable_encoder(body), 200 if body.ready else 503)


@operations.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {}}}},
)
async def prometheus(state: State):
    text = generate_latest(state.metrics.registry)
    if state.engine is not None:
        text += state.engine.prometheus_text()
    return Response(text, media_type=CONTENT_TYPE_LATEST)
