"""``padrec bench --engine vllm`` (``padrec_vllm.vllm_plugin.bench``): figures from vLLM's
per-request metrics, and one small run of every method against the reference engine's bench."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from padrec_vllm.bench import BenchConfig, run_bench  # noqa: E402
from padrec_vllm.vllm_plugin.bench import request_result, run_vllm_bench  # noqa: E402
from test_vllm_e2e import vllm_compatible_build  # noqa: E402

SLOTS = list(range(10))  # token id t has slot t: slots name output positions in these tests


def _steps(*pairs):
    return SimpleNamespace(per_step_accepted=[a for a, _ in pairs],
                           per_step_drafted=[d for _, d in pairs])


def test_request_result_aligns_steps_with_outputs():
    tokens = list(range(9))  # prefill token, then steps emitting 3, 1 and 4 tokens
    r = request_result(tokens, _steps((2, 3), (0, 3), (3, 3)), 3, SLOTS)
    assert r.target_forwards == 3 and r.tau == pytest.approx(8 / 3)
    assert r.accept_by_pos == [(2, 3), (2, 3), (1, 3)]
    # step 1 drafted positions 1, 2 (accepted), 3 (rejected); step 2: 4 (rejected); step 3: 5-7
    assert r.accept_by_slot == {1: (1, 1), 2: (1, 1), 3: (0, 1), 4: (0, 1), 5: (1, 1),
                                6: (1, 1), 7: (1, 1)}


def test_request_result_counts_forwards_without_drafts():
    r = request_result(list(range(5)), _steps((1, 2)), 3, SLOTS)  # 2 tokens recorded, 4 decoded
    assert r.target_forwards == 3 and r.tau == pytest.approx(4 / 3)
    assert r.accept_by_pos == [(1, 1), (0, 1), (0, 0)]
    assert r.accept_by_slot == {}  # steps cannot be placed: left out of the slot figures


def test_request_result_stops_at_the_output_end():
    r = request_result([0, 1, 2], _steps((3, 3)), 3, SLOTS)  # eos among the accepted drafts
    assert r.target_forwards == 1 and r.tau == 2.0
    assert r.accept_by_slot == {1: (1, 1), 2: (1, 1)}


def test_request_result_without_speculation():
    r = request_result(list(range(6)), None, 3, SLOTS)
    assert (r.target_forwards, r.tau, r.accept_by_pos, r.accept_by_slot) == (5, 1.0, [], {})


def test_vllm_bench_matches_reference_bench(tiny_artifacts, synth_data_dir, tmp_path_factory):
    art = vllm_compatible_build(tiny_artifacts, synth_data_dir, tmp_path_factory.getbasetemp())
    cfg = BenchConfig(artifacts=art, methods=("ar", "ngram", "eagle", "padrec"), users=8,
                      batch_size=4, data_dir=str(synth_data_dir))
    got = run_vllm_bench(cfg, enforce_eager=True)
    ref = run_bench(BenchConfig(artifacts=art, methods=("ar", "eagle", "padrec"), users=8,
                                batch_size=4, data_dir=str(synth_data_dir)))
    assert got.keys() == ref.keys() and got["engine"] == "vllm"
    assert got["quality"] == ref["quality"]  # same lists
    for name, m in got["methods"].items():
        assert m.keys() == ref["methods"]["ar"].keys()
        assert m["identical_rate"] == 1.0 and m["wall_s"] > 0
    assert got["methods"]["ar"]["tau"] == 1.0
    for name in ("eagle", "padrec"):
        m, r = got["methods"][name], ref["methods"][name]
        assert m["tau"] == pytest.approx(r["tau"], rel=0.02)
        assert m["accept_by_pos"] == pytest.approx(r["accept_by_pos"], abs=0.05)
        assert set(m["accept_by_slot"]) <= set(r["accept_by_slot"]) | {"special"}
    assert got["methods"]["ngram"]["tau"] >= 1.0
