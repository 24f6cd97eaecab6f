"""The FastAPI app: ``create_app(settings)`` builds it; its lifespan owns one engine.

Start-up: the lifespan loads the catalog (fast; a bad artifacts directory fails the start), then
starts the engine in a background task, so ``/healthz`` answers at once while the model loads
and warms up; ``/readyz`` and ``/recommend`` answer 503 (with Retry-After) until it is ready.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from padrec_vllm.engine_api import Calibration, Engine, EngineError
from padrec_vllm.errors import UserError
from server.engines import build_engine
from server.metrics import ServerMetrics, slot_names
from server.middleware import BodyLimit, RequestMetrics
from server.recommender import Plan, Recommender, UnknownItems
from server.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorBody,
    Health,
    Latency,
    Readiness,
    RecommendRequest,
    RecommendResponse,
    SpecInfo,
)
from server.settings import Settings

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


class Unavailable(Exception):
    def __init__(self, code: str, message: str):
        self.code, self.message = code, message
        super().__init__(message)


@dataclass
class ServerState:
    settings: Settings
    metrics: ServerMetrics
    engine_factory: object
    recommender: Recommender | None = None
    engine: Engine | None = None
    status: str = "starting"
    error: str | None = None
    calibration: Calibration | None = None
    in_flight: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)

    def check_alive(self) -> None:
        if self.status == "ready" and not self.engine.alive():
            self.status, self.error = "failed", "the engine died"
            log.error("the engine died")

    def admit(self, n: int) -> None:
        self.check_alive()
        if self.status != "ready":
            raise Unavailable(
                "not_ready", f"engine is {self.status}" + (f": {self.error}" if self.error else "")
            )
        if self.in_flight + n > self.settings.max_in_flight:
            self.metrics.rejected.labels("overload").inc()
            raise Unavailable(
                "overloaded",
                f"{self.in_flight} recommendations in flight "
                f"(limit {self.settings.max_in_flight}); retry later",
            )
        self.in_flight += n
        self.metrics.in_flight.set(self.in_flight)

    def release(self, n: int) -> None:
        self.in_flight -= n
        self.metrics.in_flight.set(self.in_flight)

    async def start_engine(self) -> None:
        rec, s = self.recommender, self.settings
        try:
            self.engine = self.engine_factory(s)
            prompts = rec.warmup_prompts(max(s.calibration_requests, 2))
            budget = rec.budget(10, len(prompts[0]))
            self.calibration = await self.engine.start(
                prompts, budget, calibrate=s.calibration_requests > 0
            )
            rec.max_model_len = min(rec.max_model_len or 1 << 30, self.engine.max_model_len)
            if self.calibration is not None:
                self.metrics.set_calibration(self.calibration)
                log.info(
                    "calibration: speedup %.2fx, tau %.2f, identical %.0f%% (%d requests)",
                    self.calibration.speedup,
                    self.calibration.tau,
                    100 * self.calibration.identical_rate,
                    self.calibration.requests,
                )
            self.status = "ready"
            log.info(
                "ready: %s engine, head %s, K=%d",
                self.engine.name,
                self.engine.config.head,
                self.engine.num_draft_tokens,
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any start failure: reported by /readyz and /healthz
            self.status, self.error = "failed", str(exc)
            log.exception("engine failed to start")

    async def recommend(self, plan: Plan, t0: float) -> RecommendResponse:
        rec, metrics = self.recommender, self.metrics
        gen = None
        engine_s = 0.0
        if not plan.cold_start:
            t_engine = time.perf_counter()
            gen = await self.engine.generate(plan.prompt, plan.max_new_tokens)
            engine_s = time.perf_counter() - t_engine
            metrics.observe_generation(gen)
        ans = rec.answer(plan, gen)
        metrics.observe_items(
            ans.generated_items, ans.invalid, ans.duplicate, ans.in_history, ans.generation.filled
        )
        k = self.engine.num_draft_tokens
        if gen is not None:
            latency = Latency(
                total=0.0,
                queue=gen.queue_s * 1e3,
                prefill=gen.prefill_s * 1e3,
                decode=gen.decode_s * 1e3,
                engine=engine_s * 1e3,
            )
            spec = SpecInfo(
                speculative=gen.speculative,
                draft_tokens=gen.draft_tokens,
                accepted_tokens=gen.accepted_tokens,
                tau=gen.tau,
                target_forwards=gen.target_forwards,
                acceptance_by_position=[a / p if p else 0.0 for a, p in gen.accept_by_pos],
            )
        else:
            latency = Latency(total=0.0, queue=0.0, prefill=0.0, decode=0.0, engine=0.0)
            spec = SpecInfo(
                speculative=False,
                draft_tokens=0,
                accepted_tokens=0,
                tau=0.0,
                target_forwards=0,
                acceptance_by_position=[],
            )
        latency.total = (time.perf_counter() - t0) * 1e3
        return RecommendResponse(
            items=ans.items,
            k=plan.request.k,
            user_id=plan.request.user_id,
            model=rec.model,
            engine=self.engine.name,
            head=self.engine.config.head,
            num_draft_tokens=k,
            history=ans.history,
            generation=ans.generation,
            latency_ms=latency,
            spec=spec,
            notes=ans.notes,
        )


def check(settings: Settings) -> Recommender:
    """Fail early (UserError) on what would stop the server from ever becoming ready."""
    rec = Recommender.load(
        settings.artifacts,
        max_history=settings.max_history,
        extra_items=settings.extra_items,
        data_dir=settings.data_dir,
    )
    if settings.speculative:
        head = Path(settings.artifacts) / "heads" / settings.head
        if not (head / "config.json").is_file():
            raise UserError(
                f"no {settings.head} head in {head} (train it with `padrec build`, "
                "choose another with PADREC_HEAD, or set PADREC_SPECULATIVE=false)"
            )
    target_cfg = json.loads((Path(settings.artifacts) / "target" / "config.json").read_text())
    rec.max_model_len = int(target_cfg.get("max_position_embeddings", 1 << 30))
    longest = (
        len(rec.catalog.prompt_ids([], 0)) + rec.max_history * rec.catalog.layout.tokens_per_item
    )
    if longest + rec.catalog.layout.tokens_per_item + 1 > rec.max_model_len:
        raise UserError(
            f"max_history={rec.max_history} makes prompts of {longest} tokens; the model "
            f"takes {rec.max_model_len} in all (lower PADREC_MAX_HISTORY)"
        )
    return rec


def create_app(settings: Settings | None = None, *, engine_factory=build_engine) -> FastAPI:
    """The app. ``engine_factory(settings) -> Engine`` is called once, by the lifespan."""
    settings = settings if settings is not None else Settings()
    metrics = ServerMetrics({})
    state = ServerState(settings, metrics, engine_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state.recommender = check(settings)
        metrics.slot_names.update(slot_names(state.recommender.catalog.layout.num_levels))
        state.task = asyncio.create_task(state.start_engine(), name="padrec-engine-start")
        try:
            yield
        finally:
            state.task.cancel()
            try:
                await state.task
            except asyncio.CancelledError:
                pass
            if state.engine is not None:
                await state.engine.close()

    app = FastAPI(
        title="padrec-vllm recommendation server",
        version="0.1.0",
        description="Generative list-wise recommendation with PAD-Rec speculative decoding. "
        "See docs/SERVER.md.",
        lifespan=lifespan,
    )
    app.state.server = state

    @app.exception_handler(RequestValidationError)
    async def on_validation(request: Request, exc: RequestValidationError):
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

    @app.exception_handler(UnknownItems)
    async def on_unknown(request: Request, exc: UnknownItems):
        return JSONResponse(
            {
                "error": "unknown_items",
                "message": str(exc),
                "detail": {"field": exc.field, "items": exc.items},
            },
            422,
        )

    @app.exception_handler(Unavailable)
    async def on_unavailable(request: Request, exc: Unavailable):
        return JSONResponse(
            {"error": exc.code, "message": exc.message},
            503,
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    @app.exception_handler(EngineError)
    async def on_engine_error(request: Request, exc: EngineError):
        log.error("engine error: %s", exc)
        return JSONResponse(
            {"error": "engine_error", "message": str(exc)},
            503,
            headers={"Retry-After": str(settings.retry_after_s)},
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(
            {"error": _http_code(exc.status_code), "message": str(exc.detail)},
            exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.post(
        "/recommend",
        response_model=RecommendResponse,
        responses=ERRORS,
        summary="Recommend k items for one user history",
    )
    async def recommend(body: RecommendRequest) -> RecommendResponse:
        t0 = time.perf_counter()
        state.admit(1)
        try:
            plan = state.recommender.plan(body)
            return await state.recommend(plan, t0)
        finally:
            state.release(1)

    @app.post(
        "/recommend/batch",
        response_model=BatchResponse,
        responses=ERRORS,
        summary="Several recommendation requests, answered in order",
    )
    async def recommend_batch(body: BatchRequest) -> BatchResponse:
        t0 = time.perf_counter()
        n = len(body.requests)
        if n > settings.max_batch_requests:
            raise RequestValidationError(
                [
                    {
                        "loc": ("body", "requests"),
                        "type": "too_long",
                        "msg": f"at most {settings.max_batch_requests} requests per batch, got {n}",
                    }
                ]
            )
        state.admit(n)
        try:
            plans = [
                state.recommender.plan(r, f"requests[{i}].history")
                for i, r in enumerate(body.requests)
            ]
            responses = await asyncio.gather(*(state.recommend(p, t0) for p in plans))
            return BatchResponse(responses=list(responses))
        finally:
            state.release(n)

    @app.get(
        "/healthz",
        response_model=Health,
        responses={503: {"model": Health}},
        summary="Process alive (503 once the engine has failed)",
    )
    async def healthz():
        state.check_alive()
        if state.status == "failed":
            return JSONResponse({"status": "failed"}, 503)
        return Health(status="ok")

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={503: {"model": Readiness}},
        summary="Engine loaded and warmed up",
    )
    async def readyz():
        state.check_alive()
        body = _readiness(state)
        return JSONResponse(jsonable_encoder(body), 200 if body.ready else 503)

    @app.get(
        "/metrics",
        response_class=Response,
        summary="Prometheus metrics",
        responses={200: {"content": {"text/plain": {}}}},
    )
    async def prometheus():
        text = generate_latest(metrics.registry)
        if state.engine is not None:
            text += state.engine.prometheus_text()
        return Response(text, media_type=CONTENT_TYPE_LATEST)

    endpoints = {r.path for r in app.routes}
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
    app.add_middleware(RequestMetrics, metrics=metrics, endpoints=endpoints)
    return app


def _readiness(state: ServerState) -> Readiness:
    rec, engine, c = state.recommender, state.engine, state.calibration
    calib = None
    if c is not None:
        calib = {
            "speedup": c.speedup,
            "requests": c.requests,
            "plain_s": c.plain_s,
            "speculative_s": c.speculative_s,
            "identical_rate": c.identical_rate,
            "tau": c.tau,
            "batch_rows": c.batch_rows,
        }
    return Readiness(
        ready=state.status == "ready",
        status=state.status,
        engine=state.settings.engine,
        model=rec.model if rec else "?",
        head=state.settings.head if state.settings.speculative else None,
        num_draft_tokens=engine.num_draft_tokens if engine and state.status == "ready" else 0,
        fallback=rec.popularity_source if rec else "?",
        error=state.error,
        calibration=calib,
    )


def _loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _http_code(status: int) -> str:
    return {404: "not_found", 405: "method_not_allowed"}.get(status, f"http_{status}")
