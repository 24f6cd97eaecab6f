"""``padrec bench --calibrate``: the server's start-up calibration, offline.

The same measurement as the server's ``PADREC_SPEC_SCHEDULE=auto`` start
(``engines.calibration``: every K at batch sizes 1, 2, 4, ... up to the engine's batch, lists of
``DEFAULT_K`` items under the catalog constraint, random catalog histories of the preset's length),
printed as a table and stored where the server looks (``<artifacts>/calibration``), under the key
a server with the same engine settings computes, so that its next start reuses it.
"""

from __future__ import annotations

from pathlib import Path

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.constraint import ListSpec
from padrec_vllm.engines import Calibration, Engine, calibrate
from padrec_vllm.engines import calibration_store as store
from padrec_vllm.engines.calibration import (
    batch_sizes_up_to,
    calibration_prompts,
    prompts_needed,
)
from padrec_vllm.presets import get_preset

DEFAULT_K = 10  # items per calibration list, as the server's default k
DEFAULT_REQUESTS = 16  # prompts per point, as PADREC_CALIBRATION_REQUESTS


def list_budget(catalog: Catalog, k: int) -> int:
    """Tokens of a list of ``k`` items and ``<eos>`` (the server's budget under the constraint,
    within the model's length)."""
    return k * catalog.layout.tokens_per_item + 1


async def calibrate_offline(
    engine: Engine,
    *,
    requests: int = DEFAULT_REQUESTS,
    constrained: bool = True,
    progress=print,
) -> tuple[Calibration, Path]:
    """Start ``engine`` (not started yet), calibrate it as the server would and store the result;
    returns it and where it was stored."""
    paths = ArtifactPaths(Path(engine.config.artifacts))
    catalog = Catalog.load(paths.root)
    history = get_preset(paths.read_build_info()["preset"]).history
    top = engine.config.max_batch_size
    prompts = calibration_prompts(catalog, max(prompts_needed(requests, top), 2), history)
    longest = int(paths.target_config().get("max_position_embeddings", 1 << 30))
    budget = max(min(list_budget(catalog, DEFAULT_K), longest - len(prompts[0])), 1)
    constraint = ListSpec(k=DEFAULT_K) if constrained else None
    await engine.start(prompts[:2], budget, constraint=constraint)
    try:
        if engine.max_draft_tokens == 0:
            raise ValueError("the engine has no head to calibrate")
        result = await calibrate(engine, prompts, budget, constraint=constraint,
                                 max_k=engine.max_draft_tokens, requests=requests,
                                 max_batch=top, progress=progress)
    finally:
        await engine.close()
    key = store.calibration_key(engine.config, engine.name, requests=requests, max_batch=top,
                                budget=budget, constrained=constrained,
                                sizes=batch_sizes_up_to(top))
    return result, store.save(paths.root / store.FOLDER, key, result)
