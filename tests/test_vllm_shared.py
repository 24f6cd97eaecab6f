"""The shared token format on vLLM (CPU): the padrec head reads slots from positions.

One engine (the shared tiny build's target with its padrec head, float32, greedy), built once.
Claims checked, on the tiny build's test users:
- lossless: speculative decoding equals the reference engine's plain greedy, token for token;
- the engine loaded the plugin's model, and its load-time format check passed (a shared head on a
  shared target; the refusal of the other format is tested in test_vllm_plugin.py);
- slots from positions inside vLLM: for single-prompt requests, every draft forward's inputs
  (the ``input_ids`` and ``positions`` vLLM passed) map through ``head_slots``, the function the
  model calls, to the true slot of each token of the final sequence.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

import cloudpickle  # noqa: E402  (a vLLM dependency)

from build_users import build_users  # noqa: E402  (tests/build_users.py)
from padrec_vllm.catalog.tokens import EOS_ID  # noqa: E402
from padrec_vllm.decoding import generate  # noqa: E402
from padrec_vllm.eval.evaluate import max_new_tokens  # noqa: E402
from padrec_vllm.model.padrec_terms import head_slots  # noqa: E402
from padrec_vllm.model.target import load_target  # noqa: E402
from test_shared_format import grammar_slots  # noqa: E402

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # probes travel by value

SINGLE = 3  # single-prompt requests whose draft forwards are checked slot by slot


def _install_recorder(worker) -> str:
    """Record the ids and positions of every draft forward (in the engine's worker)."""
    model = worker.model_runner.drafter.model
    forward, records = model.forward, []

    def recording_forward(input_ids, positions, hidden_states, inputs_embeds=None):
        records.append((input_ids.tolist(), positions.tolist()))
        return forward(input_ids, positions, hidden_states, inputs_embeds)

    model.forward = recording_forward
    worker.padrec_records = records
    return type(model).__name__


def _take_records(worker) -> list:
    records = list(worker.padrec_records)
    worker.padrec_records.clear()
    return records


@pytest.fixture(scope="module")
def shared_run(tiny_shared_artifacts, synth_data_dir):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    b = build_users(tiny_shared_artifacts, synth_data_dir)
    paths, preset, catalog = b.paths, b.preset, b.catalog
    prompts = b.prompts[:32] + [catalog.prompt_ids([], preset.history)]
    limit = max_new_tokens(catalog, preset.list_len)
    plain = generate(load_target(paths.target, dtype=torch.float32), prompts,
                     max_new_tokens=limit, eos_id=EOS_ID, batch_size=16)
    spec = {"method": "eagle", "model": str(paths.head("padrec")),
            "num_speculative_tokens": preset.num_draft_tokens}
    env = {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
           "VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        llm = LLM(model=str(paths.target), speculative_config=spec, dtype="float32",
                  enforce_eager=True, seed=0)
        try:
            params = SamplingParams(temperature=0, max_tokens=limit, stop_token_ids=[EOS_ID])
            model_class = llm.collective_rpc(_install_recorder)[0]
            singles = []
            for prompt in prompts[:SINGLE] + prompts[-1:]:
                out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params,
                                   use_tqdm=False)
                singles.append((prompt, list(out[0].outputs[0].token_ids),
                                llm.collective_rpc(_take_records)[0]))
            outs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params,
                                use_tqdm=False)
        finally:
            llm.llm_engine.engine_core.shutdown()
            del llm
    return {"catalog": catalog, "plain": [r.tokens for r in plain],
            "spec": [list(o.outputs[0].token_ids) for o in outs], "singles": singles,
            "model_class": model_class, "head_dir": paths.head("padrec")}


def test_padrec_head_runs_as_the_plugin_model(shared_run):
    assert shared_run["model_class"] == "EaglePadRecLlamaForCausalLM"


def test_lossless_on_the_shared_format(shared_run):
    assert shared_run["spec"] == shared_run["plain"]


def test_vllm_positions_give_every_draft_input_its_true_slot(shared_run):
    from padrec_vllm.model.head_checkpoint import load_head

    rule = load_head(shared_run["head_dir"]).slot_rule
    assert rule.kind == "position"
    table = torch.tensor(rule.table)
    num_levels = shared_run["catalog"].layout.num_levels
    for prompt, completion, records in shared_run["singles"]:
        seq = prompt + completion
        truth = grammar_slots(seq, num_levels)
        # vLLM runs unconstrained here: the tiny target may emit a malformed item (a <sep> after
        # fewer than L codes), after which grammar and positions no longer define one slot;
        # check the well-formed prefix
        by_pos = rule.sequence_slots(seq)
        good = next((i for i, (a, b) in enumerate(zip(by_pos, truth)) if a != b), len(seq))
        assert good >= len(prompt)
        seq = seq[:good]
        seen = set()
        for ids, pos in records:
            slots = head_slots(table, rule.period, rule.offset, torch.tensor(ids),
                               torch.tensor(pos)).tolist()
            for t, p, s in zip(ids, pos, slots):
                if p + 1 < len(seq) and seq[p + 1] == t:  # the input at position p is x_{p+1}
                    assert s == truth[p + 1], (p, t)
                    seen.add(p)
        _assert_coverage(seen, prompt, truth, num_levels)


def _assert_coverage(seen: set[int], prompt: list[int], truth: list[int], num_levels: int):
    """The checked head inputs cover the whole prompt (prefill feeds every position)."""
    assert seen >= set(range(len(prompt) - 1)), sorted(set(range(len(prompt) - 1)) - seen)
