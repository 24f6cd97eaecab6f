"""Head training on the tiny build and the side-by-side benchmark (lossless on tiny)."""

from __future__ import annotations

import json
import time

import pytest
import torch

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.bench import (
    BenchConfig,
    MethodSpec,
    bench_setup,
    format_table,
    parse_method,
    run_reference_bench,
    write_outputs,
)
from padrec_vllm.catalog.tokens import EOS_ID
from padrec_vllm.cli import main
from padrec_vllm.decoding import TreeSpec, generate
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


def test_topk_distillation_adds_the_soft_cross_entropy_to_the_target(tiny_artifacts):
    """topk = V: the added term is the cross-entropy from the target's full distribution at p+1
    (``lm_head(f_{p+1})``) to the head's, averaged over the loss positions; topk = 1 weighs the
    target's top token by its probability."""
    paths = ArtifactPaths(tiny_artifacts)
    target, head = load_target(paths.target), load_head(paths.head("padrec"))
    torch.manual_seed(0)
    v, h = target.config.vocab_size, target.config.hidden_size
    ids = torch.randint(5, v, (2, 12))
    feats = torch.randn(2, 12, h)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[:, 4:10] = True
    pad = torch.ones(2, 12, dtype=torch.long)
    base, _ = unrolled_loss(head, target, ids, feats, mask, pad, 1, 1.0)
    with_full, _ = unrolled_loss(head, target, ids, feats, mask, pad, 1, 1.0, topk=v,
                                 topk_weight=0.5)
    with torch.no_grad():
        next_ids = torch.cat([ids[:, 1:], ids.new_zeros(2, 1)], 1)
        pos = torch.arange(12)[None].expand(2, 12)
        out = head(next_ids, feats, pos, step=1, embed=target.get_input_embeddings(),
                   attention_mask=pad)
        logits = target.lm_head(out)  # [2, 12, V]
        t_prob = target.lm_head(torch.cat([feats[:, 1:], feats[:, -1:]], 1)).softmax(-1)
        soft_ce = -(t_prob * logits.log_softmax(-1)).sum(-1)  # [2, 12]
        want = soft_ce[mask].mean()
    torch.testing.assert_close(with_full - base, 0.5 * want, rtol=1e-4, atol=1e-4)
    top1, _ = unrolled_loss(head, target, ids, feats, mask, pad, 1, 1.0, topk=1)
    assert float(top1 - base) > 0 and float(top1 - base) < float(want)


SHAPE_KEYS = {"dataset", "engine", "device", "users", "num_draft_tokens", "batch_size",
              "constrained", "exclude_history", "forced_share_by_slot", "quality", "methods"}
METHOD_KEYS = {"wall_s", "tokens_per_s", "latency_ms", "tau", "accept_by_pos", "accept_by_slot",
               "speedup", "identical_rate", "target_forwards", "forced_tokens", "forced_share",
               "forwards_saved"}


@pytest.mark.parametrize("batch_size", [1, 4])
def test_constrained_bench_is_lossless_and_legal(tiny_artifacts, synth_data_dir, batch_size,
                                                 tmp_path):
    methods = ("ar", "forced", "eagle", "padrec", "padrec:t6k2")
    result = run_reference_bench(
        BenchConfig(artifacts=tiny_artifacts, methods=methods, users=12, batch_size=batch_size,
                    data_dir=str(synth_data_dir))
    )
    assert SHAPE_KEYS <= set(result) and result["constrained"] and not result["exclude_history"]
    q = result["quality"]
    assert q["invalid_item_rate"] == 0.0 and q["duplicate_rate"] == 0.0
    ms = result["methods"]
    for name in methods:
        assert METHOD_KEYS <= set(ms[name]) and ms[name]["identical_rate"] == 1.0
    ar, forced = ms["ar"], ms["forced"]
    assert ar["tau"] == 1.0 and ar["forced_tokens"] == 0 and ar["forwards_saved"] == 0
    for name in ("forced", "eagle", "padrec", "padrec:t6k2"):
        assert ms[name]["forced_tokens"] > 0 and 0 < ms[name]["forced_share"] < 1
    # plain decoding that skips forced tokens saves exactly one forward per forced token
    assert forced["forwards_saved"] == forced["forced_tokens"] > 0 and forced["tau"] > 1.0
    assert forced["accept_by_pos"] == [] and forced["draft_forwards"] == 0
    assert len(ms["padrec"]["accept_by_pos"]) == len(ms["padrec:t6k2"]["accept_by_pos"]) == 3
    shares = result["forced_share_by_slot"]
    assert shares["sep"] == 1.0 and all(0.0 <= v <= 1.0 for v in shares.values())
    write_outputs(result, tmp_path / "b.json", tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000 and len(format_table(result)) == 8
    assert "constrained" in format_table(result)[0]


def test_unconstrained_bench_is_lossless_and_shaped(tiny_artifacts, synth_data_dir, tmp_path):
    result = run_reference_bench(
        BenchConfig(artifacts=tiny_artifacts, methods=("ar", "eagle", "padrec"), users=12,
                    batch_size=4, data_dir=str(synth_data_dir), constrained=False)
    )
    assert SHAPE_KEYS <= set(result) and result["constrained"] is False
    assert result["forced_share_by_slot"] == {}
    assert set(result["quality"]) == {
        "recall_at_10",
        "ndcg_at_10",
        "invalid_item_rate",
        "duplicate_rate",
    }
    for name in ("ar", "eagle", "padrec"):
        m = result["methods"][name]
        assert m["identical_rate"] == 1.0 and METHOD_KEYS <= set(m)
        assert m["forced_tokens"] == 0 and m["forced_share"] == 0.0
    ar, padrec = result["methods"]["ar"], result["methods"]["padrec"]
    assert ar["tau"] == 1.0 and padrec["tau"] >= 1.0
    assert padrec["forwards_saved"] == ar["target_forwards"] - padrec["target_forwards"]
    assert len(padrec["accept_by_pos"]) == 3
    write_outputs(result, tmp_path / "b.json", tmp_path / "b.png")
    assert (tmp_path / "b.png").stat().st_size > 1000 and len(format_table(result)) == 6
    assert "unconstrained" in format_table(result)[0]


def test_bench_excludes_history_when_asked(tiny_artifacts, synth_data_dir):
    cfg = BenchConfig(artifacts=tiny_artifacts, methods=("ar", "forced", "padrec"), users=8,
                      batch_size=4, data_dir=str(synth_data_dir), exclude_history=True)
    result = run_reference_bench(cfg)
    assert result["exclude_history"] is True
    assert all(m["identical_rate"] == 1.0 for m in result["methods"].values())
    setup = bench_setup(cfg)
    states = setup.constraints()
    generate(load_target(setup.paths.target), setup.prompts, max_new_tokens=setup.limit,
             eos_id=EOS_ID, batch_size=4, constraints=states)
    for state, history in zip(states, setup.users.histories):
        assert state.items and not set(state.items) & set(history)
        assert len(set(state.items)) == len(state.items)


def test_bench_gated_method_runs_beside_its_head(tiny_artifacts, synth_data_dir):
    result = run_reference_bench(
        BenchConfig(
            artifacts=tiny_artifacts,
            methods=("ar", "padrec", "padrec@0.02"),
            users=6,
            batch_size=2,
            data_dir=str(synth_data_dir),
            constrained=False,
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
            constrained=False,
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
    bench = ["bench", "--artifacts", str(tiny_artifacts)]
    for bad in ("eagle@0.3", "eagle:t4", "eagle+int8"):
        args = [*bench, "--unconstrained", "--engine", "vllm", "--methods", f"ar,{bad}"]
        assert main(args) == 2
        assert "need --engine reference" in capsys.readouterr().err
    for bad in ("eagle@0.3", "padrec+int8@0.2"):  # constrained by default
        assert main([*bench, "--methods", f"ar,{bad}"]) == 2
        err = capsys.readouterr().err
        assert repr(bad) in err and "add --unconstrained" in err and len(err.splitlines()) == 1
    assert main([*bench, "--unconstrained", "--methods", "ar,forced"]) == 2
    err = capsys.readouterr().err
    assert "'forced'" in err and "drop --unconstrained" in err
    assert main([*bench, "--engine", "vllm", "--methods", "ar,forced"]) == 2
    err = capsys.readouterr().err
    assert "'forced'" in err and "reference engine only" in err and len(err.splitlines()) == 1
    assert main([*bench, "--unconstrained", "--exclude-history"]) == 2
    assert "--exclude-history needs the constraint" in capsys.readouterr().err
    assert main(["train-heads", "--artifacts", str(tiny_artifacts), "--heads", "foo"]) == 2


def test_bench_calibrate_stores_what_the_server_reuses(tiny_artifacts, synth_data_dir, capsys):
    """``padrec bench --calibrate``: the server's start-up calibration offline (reference engine,
    batch sizes 1 and 2, every K), printed and stored under the key a server with the same
    settings computes, so that server starts on the stored schedule without measuring."""
    from fastapi.testclient import TestClient

    from server import Settings, create_app

    args = ["bench", "--calibrate", "--artifacts", str(tiny_artifacts), "--max-batch", "2",
            "--calibration-requests", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "| batch size | K=0 req/s | K=1 req/s | K=2 req/s | K=3 req/s |" in out
    assert "stored in" in out
    schedule = out.split("schedule ")[-1].split(" ")[0]
    settings = Settings(artifacts=tiny_artifacts, engine="reference", max_batch_size=2,
                        calibration_requests=2, data_dir=synth_data_dir)
    with TestClient(create_app(settings)) as c:
        deadline = time.monotonic() + 300
        while (ready := c.get("/readyz").json())["status"] == "starting":
            assert time.monotonic() < deadline
            time.sleep(0.1)
    assert ready["spec_schedule"]["source"] == "stored"
    assert ready["spec_schedule"]["schedule"] == schedule == ready["calibration"]["schedule"]
