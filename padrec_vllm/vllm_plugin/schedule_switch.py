"""Switch the draft-length schedule of a running vLLM engine: the start-up calibration measures
every K at every batch size in one engine instead of one engine start per K.

vLLM 0.32's V1 scheduler keeps dynamic speculative decoding as a dense lookup, batch size -> K
(``Scheduler.dynamic_sd_lookup``, built once from ``num_speculative_tokens_per_batch_size``) and
reads it at every step; the model runner drafts the K the scheduler put in its output
(``SchedulerOutput.num_spec_tokens_to_schedule``). This module adds one engine-core utility method
(``EngineCore.padrec_set_spec_schedule``, through ``patching.install_method``) that rebuilds that
lookup with vLLM's own ``build_dynamic_sd_schedule_lookup``; the client calls it like vLLM's own
utilities (``AsyncLLM.engine_core.call_utility_async``). The new lookup applies from the next
engine step; requests in flight keep their tokens (any K is lossless), only their draft length
changes.

Limits: the engine must have started with a per-batch-size schedule (the lookup exists; the vLLM
engine always starts so, ``async_engine.speculative_config``), and no K may exceed its
``num_speculative_tokens`` (the drafter's buffers are sized for it). On GPU, CUDA graphs are
captured for the K values of the start-up schedule; a K switched in at run time that was not
captured runs eagerly, so a GPU deployment should restart with the stored calibration
(``PADREC_SPEC_SCHEDULE``) once measured.
"""

from __future__ import annotations

from padrec_vllm.engines.schedule import SpecSchedule
from padrec_vllm.vllm_plugin.patching import install_method

ENGINE_CORE = ("vllm.v1.engine.core", "EngineCore")
METHOD = "padrec_set_spec_schedule"


def _set_spec_schedule(self, ranges: list[list[int]]) -> list[int]:
    """Engine-core side: replace the scheduler's batch size -> K lookup by ``ranges``
    (``[[first, last, K], ...]``, vLLM's form); returns the new lookup."""
    from vllm.v1.spec_decode.dynamic.utils import build_dynamic_sd_schedule_lookup

    scheduler = self.scheduler
    lookup = getattr(scheduler, "dynamic_sd_lookup", None)
    if lookup is None:
        raise RuntimeError("this vLLM engine started without num_speculative_tokens_per_batch_size"
                           "; its draft-length schedule cannot change")
    most = int(scheduler.num_spec_tokens)
    if any(int(k) > most for _, _, k in ranges):
        raise ValueError(f"schedule {ranges} drafts more than the engine's {most} tokens")
    new = build_dynamic_sd_schedule_lookup([tuple(r) for r in ranges], len(lookup) - 1, most)
    scheduler.dynamic_sd_lookup = new
    return new


def install() -> None:
    """Add the engine-core method (idempotent; PatchError when vLLM changed)."""
    install_method(ENGINE_CORE, METHOD, _set_spec_schedule)


async def switch(async_llm, schedule: SpecSchedule, max_num_seqs: int) -> None:
    """Make the engine core of ``async_llm`` draft by ``schedule`` from its next step."""
    await async_llm.engine_core.call_utility_async(
        METHOD, [list(r) for r in schedule.to_vllm(max_num_seqs)]
    )
