"""End to end on vLLM (CPU): target + eagle / padrec head in vLLM's own speculative decoding.

Four engines, each built once for the module and shut down before the next: plain decoding with
the plugin disabled and enabled, then speculative decoding with each head. Every test reads the
stored results. Claims checked, on every test user of the tiny build:
- outputs: speculative == plain vLLM == the reference engine, token for token (greedy, float32);
- the plugin leaves a plain run unchanged (tokens and logprobs, plugin off vs on);
- acceptance counters above zero; the draft step seen by the model runs 1..K in every round;
- same math: every draft forward vLLM ran for two single-prompt requests, replayed through the
  reference ``DraftHead`` (same inputs, same order, its own KV cache), gives the same logits;
- tau: vLLM's (decode tokens / verification rounds) against the reference engine's.

Test-only probes run inside vLLM's engine process through ``LLM.collective_rpc`` (callables are
sent by value, which needs ``VLLM_ALLOW_INSECURE_SERIALIZATION=1``); nothing in the plugin records.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import cloudpickle  # noqa: E402  (a vLLM dependency)

from build_users import build_users  # noqa: E402  (tests/build_users.py)
from padrec_vllm.artifacts import ArtifactPaths  # noqa: E402
from padrec_vllm.catalog.tokens import EOS_ID  # noqa: E402
from padrec_vllm.decoding import aggregate, generate  # noqa: E402
from padrec_vllm.eval.evaluate import max_new_tokens  # noqa: E402
from padrec_vllm.model.config import ARCHITECTURES  # noqa: E402
from padrec_vllm.model.decoding_head import decoding_head  # noqa: E402
from padrec_vllm.model.head_checkpoint import load_head  # noqa: E402
from padrec_vllm.model.target import load_target  # noqa: E402
from tiny_models import assert_close_to_rounding  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # probes travel by value

HEADS = ("eagle", "padrec")
REPLAYED = 2  # single-prompt requests whose draft forwards are replayed through the reference
TAU_MARGIN = 0.02  # relative; see test_tau_matches_reference_engine


# --- probes: run inside vLLM's worker (``self`` is the worker) ----------------------------------


def _plugin_state(worker) -> bool:
    mod = sys.modules.get("padrec_vllm.vllm_plugin")
    return bool(mod is not None and mod._registered)


def _install_recorder(worker) -> str:
    """Record every draft forward: step read from the head, inputs and output feature."""
    model = worker.model_runner.drafter.model
    padrec = getattr(model.model, "padrec", None)
    forward, records = model.forward, []

    def recording_forward(input_ids, positions, hidden_states, inputs_embeds=None):
        out = forward(input_ids, positions, hidden_states, inputs_embeds)
        records.append({
            "step": int(padrec.draft_index) + 1 if padrec is not None else None,
            "ids": input_ids.tolist(), "pos": positions.tolist(),
            "h_in": hidden_states.detach().clone(), "h_out": out[0].detach().clone(),
        })
        return out

    model.forward = recording_forward
    worker.padrec_records = records
    return type(model).__name__


def _take_records(worker, full: bool) -> list[dict]:
    records = list(worker.padrec_records)
    worker.padrec_records.clear()
    return records if full else [{"step": r["step"], "tokens": len(r["ids"])} for r in records]


# --- engines and reference --------------------------------------------------------------------


@dataclass
class Workload:
    target: Path
    heads: dict[str, Path]
    prompts: list[list[int]]
    limit: int
    num_draft_tokens: int


@dataclass
class EngineRun:
    tokens: list[list[int]]
    logprobs: list[list[float]] | None
    plugin_loaded: bool
    model_class: str | None = None
    counters: dict | None = None  # the batched run's: drafts, draft_tokens, accepted, per_pos
    steps: list[int | None] | None = None  # the batched run's draft forwards
    replays: list[list[dict]] | None = None  # per single-prompt request, every draft forward


def _supported_head_dim(target: Path) -> bool:
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    cfg = json.loads((target / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return head_dim in CPUAttentionBackend.get_supported_head_sizes()


def vllm_compatible_build(tiny_artifacts: Path, synth_data_dir: Path, base: Path) -> Path:
    """The tiny build; its head size must be one vLLM's CPU attention supports."""
    assert _supported_head_dim(ArtifactPaths(tiny_artifacts).target), \
        "tiny preset head size unsupported by vLLM CPU"
    return tiny_artifacts


@pytest.fixture(scope="module")
def vllm_artifacts(tiny_artifacts, synth_data_dir, tmp_path_factory) -> Path:
    return vllm_compatible_build(tiny_artifacts, synth_data_dir, tmp_path_factory.getbasetemp())


@pytest.fixture(scope="module")
def workload(vllm_artifacts, synth_data_dir) -> Workload:
    b = build_users(vllm_artifacts, synth_data_dir)
    return Workload(b.paths.target, {h: b.paths.head(h) for h in HEADS}, b.prompts,
                    max_new_tokens(b.catalog, b.preset.list_len), b.preset.num_draft_tokens)


def _spec_counters(llm) -> dict:
    out = {"drafts": 0, "draft_tokens": 0, "accepted": 0, "per_pos": []}
    names = {"vllm:spec_decode_num_drafts": "drafts",
             "vllm:spec_decode_num_draft_tokens": "draft_tokens",
             "vllm:spec_decode_num_accepted_tokens": "accepted"}
    for m in llm.get_metrics():
        if m.name in names:
            out[names[m.name]] = m.value
        elif m.name == "vllm:spec_decode_num_accepted_tokens_per_pos":
            out["per_pos"] = list(m.values)
    return out


def _run_engine(w: Workload, head: str | None, plugins: str | None = None) -> EngineRun:
    from vllm import LLM

    spec = None
    if head is not None:
        spec = {"method": "eagle", "model": str(w.heads[head]),
                "num_speculative_tokens": w.num_draft_tokens}
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}  # for the probes, in both processes
    if plugins is not None:
        env["VLLM_PLUGINS"] = plugins  # read by the engine process at its start
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        llm = LLM(model=str(w.target), speculative_config=spec, dtype="float32", enforce_eager=True,
                  disable_log_stats=False, seed=0)
        try:
            return _drive(llm, w, head)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm


def _drive(llm, w: Workload, head: str | None) -> EngineRun:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    run = EngineRun([], None, llm.collective_rpc(_plugin_state)[0])
    params = SamplingParams(temperature=0, max_tokens=w.limit, stop_token_ids=[EOS_ID],
                            logprobs=0 if head is None else None)
    if head is not None:
        run.model_class = llm.collective_rpc(_install_recorder)[0]
        run.replays = []
        for prompt in w.prompts[:REPLAYED]:
            llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)
            run.replays.append(llm.collective_rpc(_take_records, args=(True,))[0])
    before = _spec_counters(llm)
    prompts = [TokensPrompt(prompt_token_ids=p) for p in w.prompts]
    outs = llm.generate(prompts, params, use_tqdm=False)
    after = _spec_counters(llm)
    run.tokens = [list(o.outputs[0].token_ids) for o in outs]
    if head is None:
        run.logprobs = [[next(iter(d.values())).logprob for d in o.outputs[0].logprobs]
                        for o in outs]
    else:
        run.steps = [r["step"] for r in llm.collective_rpc(_take_records, args=(False,))[0]]
        run.counters = {key: after[key] - before[key]
                        for key in ("drafts", "draft_tokens", "accepted")}
        per_before = before["per_pos"] or [0] * len(after["per_pos"])
        run.counters["per_pos"] = [a - b for a, b in zip(after["per_pos"], per_before)]
    return run


@pytest.fixture(scope="module")
def runs(workload) -> dict[str, EngineRun]:
    """One engine at a time: plain, each head, then plain with the plugin disabled (last: this
    process loads vLLM plugins once, at its first engine)."""
    out = {"plain": _run_engine(workload, None)}
    for head in HEADS:
        out[head] = _run_engine(workload, head)
    out["plain_no_plugin"] = _run_engine(workload, None, plugins="none")
    return out


@pytest.fixture(scope="module")
def reference(workload):
    """The reference engine on the same prompts: target, heads (``DraftHead``, the definition)
    and per-method results (decoded with each head's decoding form, as the engines do)."""
    target = load_target(workload.target)
    heads = {h: load_head(workload.heads[h], dtype=torch.float32).eval() for h in HEADS}
    results = {"plain": generate(target, workload.prompts, max_new_tokens=workload.limit,
                                 eos_id=EOS_ID, batch_size=16)}
    for h in HEADS:
        results[h] = generate(target, workload.prompts, max_new_tokens=workload.limit,
                              eos_id=EOS_ID, batch_size=16, head=decoding_head(heads[h], target),
                              num_draft_tokens=workload.num_draft_tokens)
    return target, heads, results


# --- tests ------------------------------------------------------------------------------------


def test_plugin_runs_in_engine_process(runs):
    assert runs["plain"].plugin_loaded and runs["padrec"].plugin_loaded
    assert not runs["plain_no_plugin"].plugin_loaded
    assert runs["padrec"].model_class == ARCHITECTURES["padrec"]
    assert runs["eagle"].model_class == ARCHITECTURES["eagle"]


def test_plain_run_unchanged_by_plugin(runs):
    assert runs["plain"].tokens == runs["plain_no_plugin"].tokens
    assert runs["plain"].logprobs == runs["plain_no_plugin"].logprobs  # bit for bit


def test_plain_vllm_matches_reference_engine(runs, reference, workload):
    assert len(runs["plain"].tokens) == len(workload.prompts) > 0
    assert runs["plain"].tokens == [r.tokens for r in reference[2]["plain"]]


@pytest.mark.parametrize("head", HEADS)
def test_speculative_outputs_identical(runs, reference, head):
    assert runs[head].tokens == runs["plain"].tokens
    assert runs[head].tokens == [r.tokens for r in reference[2][head]]


@pytest.mark.parametrize("head", HEADS)
def test_acceptance_counters_above_zero(runs, workload, head):
    c = runs[head].counters
    assert c["drafts"] > 0 and c["accepted"] > 0
    assert c["draft_tokens"] == workload.num_draft_tokens * c["drafts"]
    assert len(c["per_pos"]) == workload.num_draft_tokens and sum(c["per_pos"]) == c["accepted"]


def test_draft_step_runs_1_to_k_each_round(runs, workload):
    steps = runs["padrec"].steps
    rounds = len(steps) // workload.num_draft_tokens
    assert rounds > 0 and steps == list(range(1, workload.num_draft_tokens + 1)) * rounds
    for replay in runs["padrec"].replays:
        rounds = len(replay) // workload.num_draft_tokens
        assert [r["step"] for r in replay] == list(range(1, workload.num_draft_tokens + 1)) * rounds
    assert set(runs["eagle"].steps) == {None}  # the stock EAGLE model has no step


@pytest.mark.parametrize("head", HEADS)
def test_same_logits_as_reference_head(runs, reference, workload, head):
    """Replays vLLM's draft forwards through the reference head: same inputs, same order."""
    target, heads, _ = reference
    ref, embed = heads[head], target.get_input_embeddings()
    c = ref.config
    steps_seen = set()
    k = workload.num_draft_tokens
    with torch.inference_mode():
        for replay in runs[head].replays:
            cache = ref.new_cache(1, target.config.max_position_embeddings + k + 1)
            for i, r in enumerate(replay):
                step = r["step"] or (1 if i % k == 0 else i % k + 1)
                steps_seen.add(step)
                ids, pos = torch.tensor(r["ids"])[None], torch.tensor(r["pos"])[None]  # [1, T]
                hidden = ref(ids, r["h_in"][None], pos, step=step, embed=embed, cache=cache)[0]
                # float32 both, other kernels: sum orders differ along fc (2H), q/k/v (H),
                # scores (head_dim), weights x values (positions so far), o_proj (H), MLP
                # gate/up (H) and down (I), lm_head (H)
                h = c.hidden_size
                sums = 6 * h + c.head_dim + int(pos.max()) + 1 + c.intermediate_size
                assert_close_to_rounding(target.lm_head(r["h_out"]), target.lm_head(hidden),
                                         sums)
    assert steps_seen == set(range(1, workload.num_draft_tokens + 1))


@pytest.mark.parametrize("head", HEADS)
def test_tau_matches_reference_engine(runs, reference, head):
    """tau = decode tokens / verification rounds, both engines counted the same way.

    vLLM counts a round per verified draft (``num_drafts``); tokens are the outputs minus the
    prefill token. Same outputs and the same head math give the same drafts, so the only gaps
    left are float near-ties between batched kernels, hence a small margin. The counter form
    ``1 + accepted / drafts`` also counts accepted drafts cut off by eos or max_tokens.
    """
    c, outs = runs[head].counters, runs[head].tokens
    tau_vllm = sum(len(t) - 1 for t in outs) / c["drafts"]
    tau_counters = 1 + c["accepted"] / c["drafts"]
    agg = aggregate(reference[2][head])
    print(f"\n{head}: tau vLLM {tau_vllm:.4f} (counters {tau_counters:.4f}), "
          f"reference {agg.tau:.4f}; rounds {c['drafts']} vs {agg.target_forwards}; accepted by "
          f"position vLLM {c['per_pos']} vs reference {[a for a, _ in agg.accept_by_pos]}")
    assert tau_vllm == pytest.approx(agg.tau, rel=TAU_MARGIN)
    assert tau_counters >= tau_vllm
