"""vLLM's ``AsyncLLM`` behind ``padrec_vllm.engines.Engine`` (the server's vLLM engine).

One in-process ``AsyncLLM`` (its engine core runs in a child process vLLM spawns), the draft head
as vLLM's EAGLE speculator: ``speculative_config={"method": "eagle", "model": <head dir>,
"num_speculative_tokens": K}``. A padrec head resolves to ``EaglePadRecLlamaForCausalLM``
through this package's plugin entry point, an eagle head to vLLM's stock EAGLE-1.

Draft length by batch size (``engines.schedule.SpecSchedule``, ``config.schedule()``): vLLM's
dynamic speculative decoding, ``num_speculative_tokens_per_batch_size`` = its ranges up to
``max_num_seqs`` (``SpecSchedule.to_vllm``), and ``num_speculative_tokens`` = its largest K.
vLLM's scheduler then picks K for the number of requests in each engine step (0 = that step
proposes no drafts; the drafter still runs its pass over the verified tokens, so its KV cache
stays in sync). A schedule of K = 0 everywhere starts vLLM without a speculative config.

Per-request figures come from vLLM itself: ``per_request_spec_decode_metrics="detailed"`` gives
every verify round's accepted / proposed drafts (``CompletionOutput.spec_decode_metrics``), and
``RequestOutput.metrics`` the engine-core timestamps (queued, scheduled, first and last token).
They are replayed into the one accounting (``decoding.accounting.result_from_rounds``). The K a
request reports (``RequestResult.num_draft_tokens``): with one K everywhere, that K; under a
varying schedule, the most drafts any of its recorded rounds proposed (vLLM records the proposed
count of each round with drafts, not the step's K). That is exact unless every round of the request
at that K had drafts cut by the list grammar (vLLM counts only the legal ones), and a request whose
rounds ran at several K reports the largest; a request with no round with drafts reports 0 and
counts as plain.

A request with a ``ListSpec`` decodes under the catalog constraint through vLLM's structured-output
path (``structured.py``): the target is masked at every verified position, the drafter drafts
legal tokens (``draft_constraint.py``) and vLLM cuts drafts at the first illegal one. vLLM does
not skip forced tokens (it verifies them like any other), so ``forced_tokens`` stays 0 here.

vLLM's stat loggers are flushed every ``VLLM_LOG_STATS_INTERVAL`` seconds (vLLM's setting, default
10) by ``do_log_stats``, as vLLM's own API server does: its logging stat logger appends every
engine step's speculative figures to lists that only ``log()`` empties, so an engine whose
``do_log_stats`` is never called grows without bound under load. The flush also writes vLLM's
periodic throughput / acceptance line to the log while the engine is busy.

``set_schedule`` changes the schedule of the running engine (``schedule_switch.py``: vLLM's
scheduler lookup, batch size -> K, is rebuilt in the engine core), which is why a speculative engine
always starts with a per-batch-size schedule, even a uniform one. Start-up calibration
(``engines.calibration``) measures every K in this one engine; K = 0 there still runs the
drafter's pass over verified tokens, so it is a little slower than an engine without a head.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid

from padrec_vllm.catalog.catalog import LAYOUT_FILE
from padrec_vllm.catalog.constraint import ListSpec
from padrec_vllm.catalog.tokens import EOS_ID, SlotRule, TokenLayout
from padrec_vllm.decoding.accounting import RequestResult, result_from_rounds
from padrec_vllm.engines import EngineError, SpecSchedule, VllmEngineConfig
from padrec_vllm.vllm_plugin.diagnostics import watched_start


CPU_DEFAULT_KV_CACHE_BYTES = 1 << 30  # without PADREC_VLLM_KV_CACHE_GIB or VLLM_CPU_KVCACHE_SPACE


class VllmEngine:
    name = "vllm"

    def __init__(self, config: VllmEngineConfig):
        self.config = config
        self._engine = None
        self._num_drafts = 0
        self._max_drafts = 0  # K of the speculative config the engine started with
        self._schedule = SpecSchedule.off()  # set by ``start`` (reads the head's K)
        self._slots: SlotRule | None = None
        self._stats_task: asyncio.Task | None = None

    @property
    def num_draft_tokens(self) -> int:
        return self._num_drafts

    @property
    def schedule(self) -> SpecSchedule:
        return self._schedule

    @property
    def max_model_len(self) -> int:
        return int(self._engine.model_config.max_model_len)

    @property
    def max_draft_tokens(self) -> int:
        return self._max_drafts

    async def start(
        self,
        warmup_prompts: list[list[int]],
        max_new_tokens: int,
        constraint: ListSpec | None = None,
    ) -> None:
        self._slots = TokenLayout.load(self.config.paths.root / LAYOUT_FILE).slot_rule()
        self._schedule = self.config.schedule()
        self._num_drafts = self._max_drafts = self._schedule.max_k
        self._engine = await asyncio.to_thread(self._build, self._num_drafts > 0)
        self._stats_task = asyncio.create_task(self._flush_stats(self._engine))
        if warmup_prompts:
            await self._run(self._engine, warmup_prompts, max_new_tokens, self._num_drafts,
                            constraint)

    async def set_schedule(self, schedule: SpecSchedule) -> None:
        from padrec_vllm.vllm_plugin.schedule_switch import switch

        if self._engine is None:
            raise EngineError("vLLM engine is not running")
        if schedule.max_k > self._max_drafts:
            raise EngineError(
                f"schedule {schedule} drafts {schedule.max_k} tokens; this vLLM engine started "
                f"with {self._max_drafts}"
            )
        clipped = schedule.clipped(self.config.max_batch_size)
        if self._max_drafts:
            try:
                await switch(self._engine, clipped, self.config.max_batch_size)
            except Exception as exc:  # the engine core's error, one line
                raise EngineError(f"vLLM could not switch to schedule {clipped}: {exc}") from exc
        self._schedule, self._num_drafts = clipped, clipped.max_k

    def _build(self, speculative: bool):
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        c = self.config
        fields = {
            "model": str(c.paths.target),
            "dtype": c.dtype,
            "seed": 0,
            "max_num_seqs": c.max_batch_size,
            "enforce_eager": c.enforce_eager,
            "disable_log_stats": False,  # per-request timestamps and vllm:* metrics
        }
        if c.kv_cache_bytes is not None:
            fields["kv_cache_memory_bytes"] = c.kv_cache_bytes
        elif c.device == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
            # vLLM's CPU default claims most of the NUMA node's memory and fails to start on a
            # shared machine; recommendation prompts are short, 1 GiB holds thousands of them.
            fields["kv_cache_memory_bytes"] = CPU_DEFAULT_KV_CACHE_BYTES
        if speculative:
            fields["speculative_config"] = speculative_config(
                str(c.head_dir), self._schedule, c.max_batch_size
            )
            fields["per_request_spec_decode_metrics"] = "detailed"
        fields.update(c.extra_args)
        with watched_start() as cause:
            try:
                return AsyncLLM.from_engine_args(AsyncEngineArgs(**fields))
            except Exception as exc:  # any start failure means "not running"
                # the engine core's own error, not "See root cause above" (vllm_plugin.diagnostics)
                why = cause() or str(exc)
                raise EngineError(f"vLLM failed to start on {c.artifacts}: {why}") from exc

    async def _run(
        self,
        engine,
        prompts: list[list[int]],
        max_new_tokens: int,
        num_drafts: int,
        constraint: ListSpec | None = None,
    ) -> list[RequestResult]:
        calls = (self._one(engine, p, max_new_tokens, num_drafts, constraint) for p in prompts)
        return list(await asyncio.gather(*calls))

    async def generate(
        self, prompt: list[int], max_new_tokens: int, constraint: ListSpec | None = None
    ) -> RequestResult:
        if self._engine is None:
            raise EngineError("vLLM engine is not running")
        return await self._one(self._engine, prompt, max_new_tokens, self._num_drafts, constraint)

    async def _one(
        self,
        engine,
        prompt: list[int],
        max_new_tokens: int,
        num_drafts: int,
        constraint: ListSpec | None = None,
    ) -> RequestResult:
        from vllm import SamplingParams, TokensPrompt
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

        from padrec_vllm.vllm_plugin.structured import grammar_payload

        structured = None
        if constraint is not None:
            payload = grammar_payload(self.config.paths.root, constraint)
            structured = StructuredOutputsParams(grammar=payload)
        params = SamplingParams(
            temperature=0.0,
            max_tokens=max_new_tokens,
            stop_token_ids=[EOS_ID],
            output_kind=RequestOutputKind.FINAL_ONLY,
            detokenize=False,
            structured_outputs=structured,
        )
        t0 = time.perf_counter()
        final = None
        try:
            async for out in engine.generate(
                TokensPrompt(prompt_token_ids=prompt), params, request_id=uuid.uuid4().hex
            ):
                final = out
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # EngineDeadError and friends
            raise EngineError(f"vLLM request failed: {exc}") from exc
        wall = time.perf_counter() - t0
        if final is None or not final.outputs:
            raise EngineError("vLLM returned no output")
        fixed_k = num_drafts if self._schedule.uniform else None
        return _result(final, num_drafts, self._slots, wall, fixed_k)

    async def _flush_stats(self, engine) -> None:
        """Call ``engine.do_log_stats()`` every ``VLLM_LOG_STATS_INTERVAL`` s until cancelled."""
        import logging

        from vllm import envs

        while True:
            await asyncio.sleep(max(float(envs.VLLM_LOG_STATS_INTERVAL), 0.1))
            try:
                await engine.do_log_stats()
            except Exception as exc:  # a logger's failure must not stop the flushing
                logging.getLogger(__name__).warning("vLLM do_log_stats failed: %s", exc)

    async def close(self) -> None:
        if self._stats_task is not None:
            self._stats_task.cancel()
            self._stats_task = None
        if self._engine is not None:
            engine, self._engine = self._engine, None
            # on the loop's thread, so the output handler is cancelled before it can see the
            # engine core gone (from another thread it logs an EngineDeadError)
            _shutdown(engine)

    def alive(self) -> bool:
        return self._engine is not None and not self._engine.errored

    def prometheus_text(self) -> bytes:
        """vLLM's ``vllm:*`` series live in prometheus_client's default registry."""
        from prometheus_client import REGISTRY, generate_latest

        return generate_latest(REGISTRY)


def _shutdown(engine) -> None:
    """Shut down once. ``AsyncLLM.__del__`` shuts down again, and when that runs at interpreter
    exit it fails on torn-down module globals (a "TypeError ... ignored" on stderr)."""
    engine.shutdown()
    engine.shutdown = lambda *args, **kwargs: None


def speculative_config(head_dir: str, schedule: SpecSchedule, max_num_seqs: int) -> dict:
    """vLLM's ``speculative_config`` for the head at ``head_dir`` under ``schedule`` (module
    docstring); the schedule must have some K > 0."""
    if schedule.max_k < 1:
        raise ValueError(f"schedule {schedule} never speculates; start vLLM without a head")
    return {
        "method": "eagle",
        "model": head_dir,
        "num_speculative_tokens": schedule.max_k,
        # always per batch size, so that ``set_schedule`` can switch it (schedule_switch.py)
        "num_speculative_tokens_per_batch_size": schedule.to_vllm(max_num_seqs),
    }


def _result(
    final, num_drafts: int, slots: SlotRule | None, wall_s: float, fixed_k: int | None = None
) -> RequestResult:
    """One vLLM ``RequestOutput`` and its per-round speculative metrics -> ``RequestResult``.
    ``num_drafts``: the engine's largest K (0: no speculation); ``fixed_k``: the K every round
    ran with when the schedule has one, else None (K from the recorded rounds; module
    docstring)."""
    out = final.outputs[0]
    m = final.metrics
    if m is not None and m.first_token_ts:
        queue_s = max(m.scheduled_ts - m.queued_ts, 0.0)
        prefill_s = max(m.first_token_ts - m.scheduled_ts, 0.0)
        decode_s = max(m.last_token_ts - m.first_token_ts, 0.0)
    else:  # no engine timestamps: the whole wall time counts as decoding
        queue_s, prefill_s, decode_s = 0.0, 0.0, wall_s
    sd = out.spec_decode_metrics
    rounds = num_drafts and sd is not None
    accepted = list(sd.per_step_accepted) if rounds else []
    proposed = list(sd.per_step_drafted) if rounds else []
    k = fixed_k if fixed_k is not None else max(proposed, default=0)
    k = min(k, num_drafts)
    return result_from_rounds(list(out.token_ids), accepted, proposed, k, slots if k else None,
                              queue_s=queue_s, prefill_s=prefill_s, decode_s=decode_s)
