"""The state of one app and the flow of a request through it.

``ServerState`` owns the recommender, the engine and its start-up task, the in-flight count and
the status that ``/healthz`` and ``/readyz`` report (``starting`` -> ``ready`` | ``failed``; a
ready engine that dies turns ``failed``). A request is admitted (``admit``, or 503 through
``Unavailable``), planned by the recommender, decoded by the engine unless it is a cold start,
answered with exactly k items and its figures, and released. Under the catalog constraint
(``PADREC_CONSTRAINED``, the default) the plan's ``ListSpec`` goes to the engine with the prompt,
and the start-up warm-up and calibration decode under ``ListSpec(k=DEFAULT_K)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from padrec_vllm.engines import Calibration, Engine, EngineError, RequestResult
from server.calibrating import prompts_for, start_up_calibration
from server.checks import check
from server.metrics import ServerMetrics
from server.recommender import Plan, Recommender
from server.schemas import (
    DEFAULT_K,
    Latency,
    Readiness,
    RecommendResponse,
    ScheduleInfo,
    SpecInfo,
)
from server.settings import Settings

log = logging.getLogger("padrec.server")

EngineFactory = Callable[[Settings], Engine]


class Unavailable(Exception):
    """The server cannot take the request now (answered 503 with Retry-After)."""

    def __init__(self, code: str, message: str):
        self.code, self.message = code, message
        super().__init__(message)


@dataclass
class ServerState:
    settings: Settings
    metrics: ServerMetrics
    engine_factory: EngineFactory
    recommender: Recommender | None = None
    engine: Engine | None = None
    status: str = "starting"
    error: str | None = None
    calibration: Calibration | None = None
    schedule_source: str = "default"  # setting | default | calibrated | stored
    in_flight: int = 0
    task: asyncio.Task | None = field(default=None, repr=False)

    # --- lifecycle

    def startup(self) -> None:
        """Load the catalog (UserError when unusable), then start the engine in the background."""
        self.recommender = check(self.settings)
        self.metrics.set_slot_labels(self.recommender.catalog.layout.slot_labels())
        self.metrics.set_constrained(self.settings.constrained)
        self.task = asyncio.create_task(self.start_engine(), name="padrec-engine-start")

    async def shutdown(self) -> None:
        """Cancel a start still running, then close the engine."""
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.engine is not None:
            await self.engine.close()

    async def start_engine(self) -> None:
        """Build, warm up and calibrate the engine (lists of ``DEFAULT_K`` items, under the
        constraint when it is on; ``server.calibrating``); any failure leaves the state
        ``failed``."""
        rec, s = self.recommender, self.settings
        try:
            self.engine = self.engine_factory(s)
            prompts = rec.warmup_prompts(max(prompts_for(s), 2))
            budget = rec.budget(DEFAULT_K, len(prompts[0]))
            constraint = rec.list_spec(DEFAULT_K)
            await self.engine.start(prompts[:2], budget, constraint=constraint)
            rec.max_model_len = min(rec.max_model_len or 1 << 30, self.engine.max_model_len)
            self.calibration, self.schedule_source = await start_up_calibration(
                s, self.engine, prompts, budget, constraint
            )
            if self.calibration is not None:
                self.metrics.set_calibration(self.calibration)
                log.info(
                    "calibration: schedule %s, speedup %.2fx where it drafts, tau %.2f, "
                    "identical %.0f%% (%d requests, %.0f s)",
                    self.calibration.schedule,
                    self.calibration.speedup,
                    self.calibration.tau,
                    100 * self.calibration.identical_rate,
                    self.calibration.requests,
                    self.calibration.seconds,
                )
            self.metrics.set_schedule(self.engine.schedule)
            self.status = "ready"
            log.info(
                "ready: %s engine, head %s, draft-length schedule %s (%s), %s",
                self.engine.name,
                self.engine.config.head,
                self.engine.schedule,
                self.schedule_source,
                "catalog constraint on" if rec.constrained else "free decoding (no constraint)",
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any start failure: reported by /readyz and /healthz
            self.status, self.error = "failed", str(exc)
            if not isinstance(exc, EngineError):  # not an engine's own report: its traceback
                log.exception("engine start raised %s", type(exc).__name__)
            # last: the cause in one line (an EngineError names it: vllm_plugin.diagnostics)
            log.error("engine failed to start: %s", self.error)

    def check_alive(self) -> None:
        if self.status == "ready" and not self.engine.alive():
            self.status, self.error = "failed", "the engine died"
            log.error("the engine died")

    # --- admission

    def admit(self, n: int) -> None:
        """Count ``n`` recommendations in flight, or raise Unavailable (not ready, overloaded)."""
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

    @contextlib.contextmanager
    def admitted(self, n: int) -> Iterator[None]:
        """``admit(n)`` for the ``with`` block, ``release(n)`` however it ends."""
        self.admit(n)
        try:
            yield
        finally:
            self.release(n)

    # --- one recommendation

    async def recommend(self, plan: Plan, t0: float) -> RecommendResponse:
        """Decode ``plan`` (no engine call for a cold start) and answer; ``t0``: request start."""
        rec, metrics = self.recommender, self.metrics
        gen = None
        engine_s = 0.0
        if not plan.cold_start:
            t_engine = time.perf_counter()
            gen = await self.engine.generate(
                plan.prompt, plan.max_new_tokens, constraint=plan.constraint
            )
            engine_s = time.perf_counter() - t_engine
            metrics.observe_generation(gen)
        ans = rec.answer(plan, gen)
        metrics.observe_items(
            ans.generated_items, ans.invalid, ans.duplicate, ans.in_history, ans.generation.filled
        )
        latency, spec = _figures(gen, engine_s)
        latency.total = (time.perf_counter() - t0) * 1e3
        return RecommendResponse(
            items=ans.items,
            k=plan.request.k,
            user_id=plan.request.user_id,
            model=rec.model,
            engine=self.engine.name,
            head=self.engine.config.head,
            num_draft_tokens=self.engine.num_draft_tokens,
            history=ans.history,
            generation=ans.generation,
            latency_ms=latency,
            spec=spec,
            notes=ans.notes,
        )

    def readiness(self) -> Readiness:
        """The body of ``/readyz``."""
        rec, engine, c = self.recommender, self.engine, self.calibration
        calib = c.summary() if c is not None else None
        ready = engine is not None and self.status == "ready"
        schedule = None
        if ready:
            schedule = ScheduleInfo(
                setting=self.settings.spec_schedule,
                schedule=str(engine.schedule),
                ranges=engine.schedule.as_list(),
                source=self.schedule_source,
            )
        return Readiness(
            ready=self.status == "ready",
            status=self.status,
            engine=self.settings.engine,
            model=rec.model if rec else "?",
            head=engine.config.head if ready else (
                self.settings.head if self.settings.speculative else None
            ),
            num_draft_tokens=engine.num_draft_tokens if ready else 0,
            fallback=rec.popularity_source if rec else "?",
            constrained=self.settings.constrained,
            error=self.error,
            calibration=calib,
            spec_schedule=schedule,
        )


def _figures(gen: RequestResult | None, engine_s: float) -> tuple[Latency, SpecInfo]:
    """Latency (ms, ``total`` left to the caller) and speculation figures of one generation;
    zeros for a cold start (``gen`` None)."""
    if gen is None:
        latency = Latency(total=0.0, queue=0.0, prefill=0.0, decode=0.0, engine=0.0)
        spec = SpecInfo(
            speculative=False,
            num_draft_tokens=0,
            draft_tokens=0,
            accepted_tokens=0,
            tau=0.0,
            target_forwards=0,
            acceptance_by_position=[],
        )
        return latency, spec
    latency = Latency(
        total=0.0,
        queue=gen.queue_s * 1e3,
        prefill=gen.prefill_s * 1e3,
        decode=gen.decode_s * 1e3,
        engine=engine_s * 1e3,
    )
    spec = SpecInfo(
        speculative=gen.speculative,
        num_draft_tokens=gen.num_draft_tokens,
        draft_tokens=gen.draft_tokens,
        accepted_tokens=gen.accepted_tokens,
        tau=gen.tau,
        target_forwards=gen.target_forwards,
        acceptance_by_position=[a / p if p else 0.0 for a, p in gen.accept_by_pos],
    )
    return latency, spec
