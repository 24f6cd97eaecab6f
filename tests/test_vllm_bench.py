"""``padrec bench --engine vllm`` (``padrec_vllm.vllm_plugin.bench``): one small run of every
method against the reference engine's bench (the replay of vLLM's per-request round counts is
tested in test_accounting.py)."""

from __future__ import annotations

from dataclasses import replace

import pytest

pytest.importorskip("vllm")
pytestmark = pytest.mark.vllm

from padrec_vllm.bench import BenchConfig, run_reference_bench  # noqa: E402
from padrec_vllm.errors import UserError  # noqa: E402
from padrec_vllm.vllm_plugin.bench import run_vllm_bench  # noqa: E402
from test_vllm_e2e import vllm_compatible_build  # noqa: E402


@pytest.fixture(scope="module")
def art(tiny_artifacts, synth_data_dir, tmp_path_factory):
    return vllm_compatible_build(tiny_artifacts, synth_data_dir, tmp_path_factory.getbasetemp())


def _compare(got: dict, ref: dict) -> None:
    assert got.keys() == ref.keys() and got["engine"] == "vllm"
    assert got["quality"] == ref["quality"]  # same lists
    for name, m in got["methods"].items():
        assert m.keys() == ref["methods"]["ar"].keys()
        assert m["identical_rate"] == 1.0 and m["wall_s"] > 0
    assert got["methods"]["ar"]["tau"] == 1.0


def test_vllm_bench_matches_reference_bench(art, synth_data_dir):
    cfg = BenchConfig(artifacts=art, methods=("ar", "ngram", "eagle", "padrec"), users=8,
                      batch_size=4, data_dir=str(synth_data_dir), constrained=False)
    with pytest.raises(UserError, match="'forced' .* reference engine only"):
        run_vllm_bench(replace(cfg, methods=("ar", "forced")), enforce_eager=True)
    got = run_vllm_bench(cfg, enforce_eager=True)
    ref = run_reference_bench(replace(cfg, methods=("ar", "eagle", "padrec")))
    _compare(got, ref)
    for name in ("eagle", "padrec"):
        m, r = got["methods"][name], ref["methods"][name]
        assert m["tau"] == pytest.approx(r["tau"], rel=0.02)
        assert m["accept_by_pos"] == pytest.approx(r["accept_by_pos"], abs=0.05)
        assert set(m["accept_by_slot"]) <= set(r["accept_by_slot"]) | {"special"}
    assert got["methods"]["ngram"]["tau"] >= 1.0


def test_constrained_vllm_bench_is_lossless(art, synth_data_dir):
    """Under the constraint (history excluded too), at batch 1 and 4: every vLLM method's lists
    equal vLLM's constrained ``ar`` and the reference engine's constrained ``ar`` (whose lists are
    legal by test_constrained_decoding.py), with no invalid or repeated item."""
    for batch, methods in ((1, ("ar", "padrec")), (4, ("ar", "eagle", "padrec"))):
        cfg = BenchConfig(artifacts=art, methods=methods, users=8,
                          batch_size=batch, data_dir=str(synth_data_dir), exclude_history=True)
        got = run_vllm_bench(cfg, enforce_eager=True)
        ref = run_reference_bench(replace(cfg, methods=("ar", "forced", "padrec")))
        _compare(got, ref)
        assert got["constrained"] and got["exclude_history"]
        assert got["quality"]["invalid_item_rate"] == got["quality"]["duplicate_rate"] == 0
