"""The draft-length schedule on vLLM (CPU runner, tiny build, padrec head), through ``VllmEngine``.

One engine with the schedule ``1:K,2:K-1,..,K:1,K+1-:0`` (vLLM's dynamic speculative decoding:
``num_speculative_tokens_per_batch_size``), driven with 1..K+2 requests at once, 8 at once, 8
staggered so that they join and leave while others decode (batch sizes cross every range boundary
mid-generation), free and under the catalog constraint. Claims:
- lossless: every completion is plain greedy decoding's (the reference, free or constrained);
- the draft-step hook: every draft proposal the model runner makes is the steps 1..k in order,
  k <= K, and every k in 1..K occurs (a step with K = 0 runs only the pass over verified tokens,
  step 1, and samples nothing);
- one request alone drafts K every round; with K+1 or more in flight rounds go without drafts;
- each result reports the K it ran with (the most drafts of its recorded rounds), <= K.

The step recorder is test_vllm_e2e's probe (``collective_rpc``, by value).
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import test_vllm_e2e as e2e

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.constraint import CatalogTrie, ListSpec
from padrec_vllm.catalog.tokens import EOS_ID
from padrec_vllm.decoding import generate
from padrec_vllm.engines import EngineError, SpecSchedule, VllmEngineConfig, calibrate
from padrec_vllm.model.target import load_target

PROMPTS = 8
CALIBRATION: list = []  # the calibration the ``phases`` engine ran
vllm_artifacts = e2e.vllm_artifacts  # the tiny build (a module fixture)
workload = e2e.workload  # its prompts, head directories, budget and K (a module fixture)


@dataclass
class Phase:
    prompts: list[list[int]]
    constrained: bool
    results: list  # RequestResult per prompt
    steps: list[int | None]  # every draft forward's step, in order
    wall_s: float


def descending(k: int) -> SpecSchedule:
    """``1:K,2:K-1,..,K:1,K+1-:0``: every K from the head's down to 0, one batch size each."""
    text = ",".join(f"{n}:{k - n + 1}" for n in range(1, k + 1)) + f",{k + 1}-:0"
    return SpecSchedule.parse(text)


def runs_of(steps: list[int | None]) -> list[list[int]]:
    """The steps split into draft proposals (each starts at step 1)."""
    out: list[list[int]] = []
    for s in steps:
        if s == 1 or not out:
            out.append([])
        out[-1].append(s)
    return out


@pytest.fixture(scope="module")
def spec(workload, vllm_artifacts) -> ListSpec:
    """A list of the preset's length (the budget holds it and ``<eos>``)."""
    per_item = Catalog.load(vllm_artifacts).layout.tokens_per_item
    return ListSpec(k=(workload.limit - 1) // per_item)


STATS_BACKLOG: list[int] = []  # steps held by vLLM's logging stat logger (phases, at the end)


def spec_backlog(async_llm) -> int:
    """Engine steps whose speculative figures vLLM's logging stat loggers still hold; -1 when
    there is no such logger (then there is nothing to check)."""
    loggers = []
    for top in async_llm.logger_manager.stat_loggers:
        loggers += [top, *getattr(top, "per_engine_stat_loggers", {}).values()]
    held = [len(lg.spec_decoding_logging.num_drafts) for lg in loggers
            if hasattr(lg, "spec_decoding_logging")]
    return sum(held) if held else -1


@pytest.fixture(scope="module")
def phases(workload, vllm_artifacts, spec) -> dict[str, Phase]:
    from padrec_vllm.vllm_plugin.async_engine import VllmEngine

    k = workload.num_draft_tokens
    prompts = workload.prompts[:PROMPTS]
    config = VllmEngineConfig(artifacts=vllm_artifacts, head="padrec", max_batch_size=PROMPTS,
                              enforce_eager=True, kv_cache_bytes=1 << 30,
                              spec_schedule=descending(k))

    async def main() -> dict[str, Phase]:
        engine = VllmEngine(config)
        await engine.start([], workload.limit)
        out: dict[str, Phase] = {}
        try:
            assert str(engine.schedule) == str(descending(k)) and engine.num_draft_tokens == k
            await engine._engine.collective_rpc(e2e._install_recorder)

            async def phase(name, some, constraint=None, stagger_s=0.0):
                async def one(i, p):
                    await asyncio.sleep(i * stagger_s)
                    return await engine.generate(p, workload.limit, constraint)

                t0 = time.perf_counter()
                results = await asyncio.gather(*(one(i, p) for i, p in enumerate(some)))
                wall = time.perf_counter() - t0
                records = (await engine._engine.collective_rpc(e2e._take_records, args=(False,)))[0]
                out[name] = Phase(some, constraint is not None, list(results),
                                  [r["step"] for r in records], wall)

            for n in range(1, k + 3):
                await phase(f"at once {n}", prompts[:n])
            await phase("at once 8", prompts)
            # staggered: arrivals T/8 apart, T one request's time alone on the warm engine, free
            # or constrained as the phase: the first drafts while 3 or fewer are in flight and
            # goes plain once more join, with room for timing off by 2x either way ("at once 1",
            # the first phase, includes warm-up and is no clock)
            await phase("free alone", prompts[:1])
            await phase("staggered", prompts, stagger_s=out["free alone"].wall_s / 8)
            await phase("constrained alone", prompts[:1], spec)
            await phase("constrained staggered", prompts, spec,
                        stagger_s=out["constrained alone"].wall_s / 8)
            # switched on the running engine (schedule_switch): the form, vLLM's JSON,
            # then off and K=1 at every batch size, then back
            await engine.set_schedule(SpecSchedule.parse(f"[[1, 1, {k}], [2, 64, 0]]"))
            assert str(engine.schedule) == f"1:{k},2-:0" and engine.num_draft_tokens == k
            await phase("1:K,2-:0 alone", prompts[:1])
            await phase("1:K,2-:0 at once 8", prompts)
            await engine.set_schedule(SpecSchedule.off())
            assert engine.num_draft_tokens == 0
            await phase("switched off alone", prompts[:1])
            await phase("switched off constrained", prompts[:2], spec)
            await engine.set_schedule(SpecSchedule.fixed(1))
            await phase("switched to 1 alone", prompts[:1])
            with pytest.raises(EngineError, match="drafts"):
                await engine.set_schedule(SpecSchedule.fixed(k + 1))
            await engine.set_schedule(descending(k))
            await phase("switched back alone", prompts[:1])
            # start-up calibration on this engine: every K at batch sizes 1 and 2
            CALIBRATION.append(await calibrate(engine, prompts, workload.limit, constraint=spec,
                                               max_k=k, requests=2, max_batch=2))
            await phase("calibrated alone", prompts[:1], spec)
            # vLLM's logging stat logger keeps every step's speculative figures until its log()
            # runs; the engine flushes it every VLLM_LOG_STATS_INTERVAL s (0.2 here)
            STATS_BACKLOG.append(spec_backlog(engine._engine))
            await phase("before the flush", prompts)
            STATS_BACKLOG.append(spec_backlog(engine._engine))
            await asyncio.sleep(1.0)
            STATS_BACKLOG.append(spec_backlog(engine._engine))
        finally:
            await engine.close()
        return out

    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # the probes, in both processes
           "VLLM_LOG_STATS_INTERVAL": "0.2"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        return asyncio.run(main())


@pytest.fixture(scope="module")
def greedy(workload, vllm_artifacts, spec):
    """Plain greedy completions of the prompts, free and under ``spec`` (the reference)."""
    target = load_target(workload.target)
    prompts = workload.prompts[:PROMPTS]
    trie = CatalogTrie.from_catalog(Catalog.load(vllm_artifacts))
    free = generate(target, prompts, max_new_tokens=workload.limit, eos_id=EOS_ID, batch_size=8)
    constrained = generate(target, prompts, max_new_tokens=workload.limit, eos_id=EOS_ID,
                           batch_size=8, constraints=[spec.start(trie) for _ in prompts])
    return {False: [r.tokens for r in free], True: [r.tokens for r in constrained]}


def test_lossless_under_the_schedule(phases, greedy):
    for name, ph in phases.items():
        assert [r.tokens for r in ph.results] == greedy[ph.constrained][: len(ph.prompts)], name


def test_draft_steps_run_1_to_k_for_every_k(phases, workload):
    k = workload.num_draft_tokens
    lengths = set()
    for name, ph in phases.items():
        for run in runs_of(ph.steps):
            assert run == list(range(1, len(run) + 1)) and len(run) <= k, (name, run)
            lengths.add(len(run))
    assert lengths == set(range(1, k + 1))
    assert {len(r) for r in runs_of(phases["at once 1"].steps)} == {k}  # alone: K every round


def test_one_request_alone_drafts_many_at_once_do_not(phases, workload):
    k = workload.num_draft_tokens
    for name in ("at once 1", "constrained alone"):
        (alone,) = phases[name].results
        assert alone.speculative and alone.num_draft_tokens == k and alone.draft_tokens > 0, name
    assert phases["at once 1"].results[0].plain_forwards == 0
    crowded = phases["at once 8"].results
    # 8 in flight: K = 0, no drafts; rounds with drafts only while the batch drains
    assert sum(r.plain_forwards > 0 for r in crowded) >= len(crowded) // 2
    assert sum(r.draft_tokens for r in crowded) < len(crowded) * phases["at once 1"].results[
        0].draft_tokens


def test_one_alone_drafts_eight_at_once_do_not(phases, workload):
    """``[[1, 1, K], [2, 64, 0]]``: alone, K drafts every round; eight sent together are plain
    (at most the first arrival may get one round in before the others join it)."""
    (alone,) = phases["1:K,2-:0 alone"].results
    assert alone.num_draft_tokens == workload.num_draft_tokens and alone.plain_forwards == 0
    crowded = phases["1:K,2-:0 at once 8"].results
    assert sum(r.num_draft_tokens > 0 for r in crowded) <= 1
    assert sum(r.draft_tokens for r in crowded) <= workload.num_draft_tokens


def test_switching_the_schedule_of_a_running_engine(phases, workload):
    """``set_schedule`` on the running engine: off -> no drafts at all; K = 1 -> one draft per
    round; back to the descending schedule -> K alone again."""
    k = workload.num_draft_tokens
    for name in ("switched off alone", "switched off constrained"):
        assert phases[name].steps == [1] * len(phases[name].steps), name  # no draft proposed
        assert all(not r.speculative and r.draft_tokens == 0 for r in phases[name].results), name
    (one,) = phases["switched to 1 alone"].results
    assert one.num_draft_tokens == 1 and one.draft_tokens > 0 and one.plain_forwards == 0
    assert {len(r) for r in runs_of(phases["switched to 1 alone"].steps)} == {1}
    (back,) = phases["switched back alone"].results
    assert back.num_draft_tokens == k and back.plain_forwards == 0


def test_calibration_in_one_vllm_engine(phases, workload):
    """``engines.calibrate`` on the running vLLM engine: every K at batch sizes 1 and 2, lists
    identical to K = 0's, and the engine left on the chosen schedule (its K alone)."""
    (c,) = CALIBRATION
    k = workload.num_draft_tokens
    assert c.chosen and c.identical_rate == 1.0 and c.batch_sizes == [1, 2]
    assert {(p.batch_size, p.k) for p in c.points} == {(b, j) for b in (1, 2)
                                                       for j in range(k + 1)}
    assert all(p.tau > 1.0 for p in c.points if p.k > 0)
    assert all(p.tau == 1.0 for p in c.points if p.k == 0)
    (alone,) = phases["calibrated alone"].results
    assert alone.num_draft_tokens == c.schedule.k_for(1)


def test_requests_cross_range_boundaries_mid_generation(phases, workload):
    for name in ("staggered", "constrained staggered"):
        results = phases[name].results
        mixed = [r for r in results if r.draft_tokens > 0 and r.plain_forwards > 0]
        assert mixed, f"{name}: no request decoded both with and without drafts"


def test_each_result_reports_its_k(phases, workload):
    k = workload.num_draft_tokens
    for name, ph in phases.items():
        for r in ph.results:
            assert 0 <= r.num_draft_tokens <= k and r.speculative == (r.num_draft_tokens > 0)
            assert r.speculative or r.draft_tokens == 0, name


def test_vllm_stat_loggers_are_flushed(phases):
    """Without the engine's periodic ``do_log_stats`` the backlog only grows (issue 18's memory
    growth under load); with it, a second after the last request it is empty."""
    assert len(STATS_BACKLOG) == 3 and min(STATS_BACKLOG) >= 0  # vLLM's logger is there
    assert STATS_BACKLOG[-1] == 0


def test_summary(phases):
    """Not a claim: the figures of every phase, for the report (-s)."""
    for name, ph in phases.items():
        ks = [r.num_draft_tokens for r in ph.results]
        drafts = [r.draft_tokens for r in ph.results]
        plain = [r.plain_forwards for r in ph.results]
        lengths = sorted({len(run) for run in runs_of(ph.steps)})
        print(f"{name}: wall {ph.wall_s:.2f}s K {ks} drafts {drafts} plain forwards {plain} "
              f"proposal lengths {lengths}")
