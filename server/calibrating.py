"""The server's start-up calibration: stored when a matching one exists, measured otherwise.

With ``PADREC_SPEC_SCHEDULE=auto`` (the default) and a head, the engine's schedule becomes the
calibration's choice (``padrec_vllm.engines.calibration``: the fastest K per batch size); it is
stored under ``PADREC_CALIBRATION_DIR`` (default ``<artifacts>/calibration``) and a restart with
the same engine settings on the same machine reuses it (``calibration_store``) unless
``PADREC_RECALIBRATE=true``. With an explicit schedule the calibration only measures it against
K = 0 (the speedup figures) and is not stored. ``PADREC_CALIBRATION_REQUESTS=0``: no calibration;
auto then keeps the engine's default schedule.
"""

from __future__ import annotations

import logging

from padrec_vllm.catalog.constraint import ListSpec
from padrec_vllm.engines import Calibration, Engine, calibrate
from padrec_vllm.engines import calibration_store as store
from padrec_vllm.engines.calibration import batch_sizes_up_to, prompts_needed
from server.settings import Settings

log = logging.getLogger("padrec.server")


def calibration_batch(settings: Settings) -> int:
    """The largest batch size calibrated."""
    return min(settings.calibration_max_batch or settings.max_batch_size, settings.max_batch_size)


def prompts_for(settings: Settings) -> int:
    """Prompts the calibration needs (0 when it does not run)."""
    if settings.calibration_requests == 0:
        return 0
    return prompts_needed(settings.calibration_requests, calibration_batch(settings))


async def start_up_calibration(
    settings: Settings,
    engine: Engine,
    prompts: list[list[int]],
    budget: int,
    constraint: ListSpec | None,
) -> tuple[Calibration | None, str]:
    """Calibrate ``engine`` (started) and leave it on the resulting schedule; returns the
    calibration (None when none ran) and where the schedule came from: ``setting``,
    ``default`` (auto without calibration), ``calibrated`` or ``stored``."""
    auto = settings.schedule() is None
    if engine.max_draft_tokens == 0 or settings.calibration_requests == 0:
        return None, "default" if auto else "setting"
    top = calibration_batch(settings)
    key = store.calibration_key(
        engine.config, engine.name, requests=settings.calibration_requests, max_batch=top,
        budget=budget, constrained=constraint is not None, sizes=batch_sizes_up_to(top),
    )
    folder = settings.calibration_folder()
    if auto and not settings.recalibrate:
        stored = store.load(folder, key)
        if stored is not None:
            await engine.set_schedule(stored.schedule)
            log.info("calibration: stored schedule %s (%s); PADREC_RECALIBRATE=true measures "
                     "again", stored.schedule, store.stored_path(folder, key))
            return stored, "stored"
    log.info("calibration: %d prompts per point, batch sizes %s, K up to %d",
             settings.calibration_requests, batch_sizes_up_to(top),
             engine.max_draft_tokens if auto else engine.schedule.max_k)
    result = await calibrate(
        engine, prompts, budget, constraint=constraint, max_k=engine.max_draft_tokens,
        schedule=None if auto else engine.schedule, requests=settings.calibration_requests,
        max_batch=top, progress=log.info,
    )
    log.info("calibration (%.0f s):\n%s", result.seconds, result.table())
    if auto:
        try:
            path = store.save(folder, key, result)
            log.info("calibration stored in %s", path)
        except OSError as exc:
            log.warning("calibration not stored (%s); the next start measures again", exc)
    return result, "calibrated" if auto else "setting"
