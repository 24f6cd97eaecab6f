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


def test_vllm_bench_matches_reference_bench(tiny_artifacts, synth_data_dir, tmp_path_factory):
    art = vllm_compatible_build(tiny_artifacts, synth_data_dir, tmp_path_factory.getbasetemp())
    cfg = BenchConfig(artifacts=art, methods=("ar", "ngram", "eagle", "padrec"), users=8,
                      batch_size=4, data_dir=str(synth_data_dir), constrained=False)
    with pytest.raises(UserError, match="does not decode under the catalog constraint"):
        run_vllm_bench(replace(cfg, constrained=True), enforce_eager=True)
    got = run_vllm_bench(cfg, enforce_eager=True)
    ref = run_reference_bench(BenchConfig(artifacts=art, methods=("ar", "eagle", "padrec"), users=8,
                                batch_size=4, data_dir=str(synth_data_dir),
                                constrained=False))
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
