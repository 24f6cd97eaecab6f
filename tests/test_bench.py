"""Head training on the tiny build and the side-by-side benchmark (lossless on tiny)."""

from __future__ import annotations

import json

import pytest
import torch

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.bench import (
    BenchConfig,
    MethodSpec,
    format_table,
    parse_method,
    run_reference_bench,
    write_outputs,
)
from padrec_vllm.cli import main
from padrec_vllm.decoding import TreeSpec
from padrec_vllm.model.head_checkpoint import load_head
from padrec_vllm.model.target import load_target
from padrec_vllm.train.heads import unrolled_loss


def test_build_trains_both_heads(tiny_artifacts):
    paths = ArtifactPaths(tiny_artifacts)
    info = paths.read_build_info()
    for kind in ("eagle", "padrec"):
        head = load_head(paths.head(kind))
        assert head.config.kind == kind and head.config.num_steps == 3
        assert info["train_heads"][kind]["steps"] == 40
    cfg = json.loads((paths.head("padrec") / "config.json").read_text())
    assert cfg["architectures"] == ["EaglePadRecLlamaForCausalLM"] and cfg["num_hidden_layers"] == 1


def test_unrolled_training_sees_every_step(tiny_artifacts):
    paths = ArtifactPaths(tiny_artifacts)
    target = load_target(paths.target)
    head = load_head(paths.head("padrec"))
    seen = []
    original = head.forward

    def spy(*args, step, **kw):
        seen.append(step)
        return original(*args, step=step, **kw)

    head.forward = spy
    ids = torch.randint(5, target.config.vocab_size, (2, 12))
    feats = torch.randn(2, 12, target.config.hidden_size)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 4:10] = True
    loss, _ = unrolled_loss(
        head, target, ids, feats, mask, torch.ones(2, 12, dtype=torch.long), 3, 1.0
    )
    assert seen == [1, 2, 3] and torch.isfinite(loss)


def test_step_decay_weights_the_unrolled_steps(tiny_artifacts):
    paths = ArtifactPaths(tiny_artifacts)
    target, head = load_target(paths.target), load_head(paths.head("padrec"))
    torch.manual_seed(0)
    ids = torch.randint(5, target.config.vocab_size, (2, 12))
    feats = torch.randn(2, 12, target.config.hidden_size)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 4:10] = True
    pad = torch.ones(2, 12, dtype=torch.long)
    per_step = [
        unrolled_loss(head, target, ids, feats, mask, pad, k, 1.0)[0] * k for k in (1, 2, 3)
    ]
    step = [
        per_step[0],
        per_step[1] - per_step[0],
        per_step[2] - per_step[1],
    ]  # each step's own loss
    for decay in (1.0, 0.5, 0.0):  # 0: step 1 alone
        weights = [decay**k for k in range(3)]
        want = sum(w * s for w, s in zip(weights, step)) / sum(weights)
        got, _ = unrolled_loss(head, target, ids, feats, mask, pad, 3, 1.0, step_decay=decay)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_bench_is_lossless_and_shaped(tiny_artifacts, synth_data_dir, batch_size, tmp_path):
    result = run_reference_bench(
        BenchConfig(
            artifacts=tiny_artifacts,
            methods=("ar", "eagle", "padrec"),
            users=12,
            batch_size=batch_size,
            data_dir=str(synth_data_dir),
        )
    )
    assert {
        "dataset",
        "engine",
        "device",
        "users",
        "num_draft_tokens",
        "batch_size",
        "quality",
        "methods",
    } <= set(result)
    assert set(result["quality"]) == {
        "recall_at_10",
        "ndcg_at_10",
        "invalid_item_rate",
        "duplicate_rate",
    }
    for name in ("ar", "eagle", "padrec"):
        m = result["methods"][name]
        assert m["identical_rate"] == 1.0
        assert {
            "wall_s",
            "tokens_per_s",
            "latency_ms",
            "tau",
            "accept_by_pos",
            "accept_by_slot",
            "speedup",
        } <= set(m)
    assert result["methods"]["ar"]["tau"] == 1.0 and result["methods"]["padrec"]["tau"] >= 1.0
    assert len(result["methods"]["padrec"]["accept_by_pos"]) == 3
    write_outputs(result, tmp_path / "b.json", tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000 and len(format_table(result)) == 6


def test_bench_gated_method_runs_beside_its_head(tiny_artifacts, synth_data_dir):
    result = run_reference_bench(
        BenchConfig(
            artifacts=tiny_artifacts,
            methods=("ar", "padrec", "padrec@0.02"),
            users=6,
            batch_size=2,
            data_dir=str(synth_data_dir),
        )
    )
    fixed, gated = result["methods"]["padrec"], result["methods"]["padrec@0.02"]
    assert gated["identical_rate"] == 1.0 and fixed["identical_rate"] == 1.0
    assert gated["head_forward_ms"] == fixed["head_forward_ms"]
    # fixed-K drafting runs K head steps a round; gated drafting never more
    assert fixed["draft_forwards"] == 3 * fixed["target_forwards"]
    assert gated["draft_forwards"] <= 3 * gated["target_forwards"]


def test_bench_tree_method_runs_beside_its_head(tiny_artifacts, synth_data_dir):
    methods = ("ar", "padrec", "padrec:t5k2", "padrec+int8", "padrec+int8:t5k2p0.05")
    result = run_reference_bench(
        BenchConfig(
            artifacts=tiny_artifacts,
            methods=methods,
            users=6,
            batch_size=2,
            data_dir=str(synth_data_dir),
        )
    )
    chain, tree = result["methods"]["padrec"], result["methods"]["padrec:t5k2"]
    assert all(result["methods"][m]["identical_rate"] == 1.0 for m in methods)
    assert tree["head_forward_ms"] == chain["head_forward_ms"]
    assert tree["draft_forwards"] == 3 * tree["target_forwards"]  # one head call per depth
    assert len(tree["accept_by_pos"]) == 3
    int8 = result["methods"]["padrec+int8"]
    assert int8["head_forward_ms"] == result["methods"]["padrec+int8:t5k2p0.05"]["head_forward_ms"]
    assert int8["head_forward_ms"] != chain["head_forward_ms"]  # timed as its own head


@pytest.mark.parametrize(
    "spec, want",
    [
        ("eagle", MethodSpec("eagle")),
        ("eagle@0.3", MethodSpec("eagle", 0.3)),
        ("padrec:t8", MethodSpec("padrec", tree=TreeSpec(8, 4))),
        ("padrec:t6k2", MethodSpec("padrec", tree=TreeSpec(6, 2))),
        ("padrec+int8:t6k2p0.1", MethodSpec("padrec", tree=TreeSpec(6, 2, 0.1), int8=True)),
        ("eagle+int8@0.2", MethodSpec("eagle", 0.2, int8=True)),
    ],
)
def test_parse_method(spec, want):
    assert parse_method(spec) == want


def test_bench_cli_errors(tiny_artifacts, capsys):
    assert (
        main(["bench", "--artifacts", str(tiny_artifacts), "--methods", "ar,medusa"]) == 2
    )  # before data
    assert "unknown method 'medusa'" in capsys.readouterr().err
    assert main(["bench", "--artifacts", str(tiny_artifacts), "--methods", "eagle"]) == 2
    for bad in (
        "eagle@1",
        "eagle@x",
        "@0.3",
        "ar@0.3",
        "eagle:t0",
        "eagle:t4k0",
        "eagle:tree",
        ":t4",
        "ar:t4",
        "eagle:t4p1.5",
        "eagle+fp16",
        "+int8",
        "ar+int8",
    ):
        assert main(["bench", "--artifacts", str(tiny_artifacts), "--methods", f"ar,{bad}"]) == 2
        assert repr(bad) in capsys.readouterr().err
    for bad in ("eagle@0.3", "eagle:t4", "eagle+int8"):
        assert (
            main(
                [
                    "bench",
                    "--artifacts",
                    str(tiny_artifacts),
                    "--engine",
                    "vllm",
                    "--methods",
                    f"ar,{bad}",
                ]
            )
            == 2
        )
        assert "need --engine reference" in capsys.readouterr().err
    assert main(["train-heads", "--artifacts", str(tiny_artifacts), "--heads", "foo"]) == 2
