"""Target training smoke test on the tiny preset and the evaluation it feeds."""

from __future__ import annotations

import json

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.tokens import EOS_ID
from padrec_vllm.cli import main
from padrec_vllm.decoding import generate
from padrec_vllm.model.target import load_target


def test_tiny_build_trains_and_evaluates(tiny_artifacts):
    paths = ArtifactPaths(tiny_artifacts)
    info = paths.read_build_info()
    train = info["train_target"]
    assert train["steps"] == 60 and train["tokens"] > 0
    assert train["final_loss"] < 3.0  # uniform over the tiny vocabulary would be ~4.3
    result = json.loads(paths.eval_file.read_text())
    assert result["users"] == 50
    # the build evaluates constrained lists: every item in the catalog, none repeated
    assert result["constrained"] is True and result["exclude_history"] is False
    assert result["target"]["invalid_item_rate"] == 0.0
    assert result["target"]["duplicate_rate"] == 0.0
    for name in ("target", "most_popular"):  # one held-out item: NDCG@10 <= Recall@10
        assert result[name]["ndcg_at_10"] <= result[name]["recall_at_10"]
    # transformers reloads the checkpoint and the tokenizer sits next to it (vLLM needs both)
    model = load_target(paths.target)
    assert (paths.target / "tokenizer.json").is_file()
    catalog = Catalog.load(tiny_artifacts)
    prompt = catalog.prompt_ids([1, 2, 3], 5)
    out = generate(model, [prompt], max_new_tokens=21, eos_id=EOS_ID, batch_size=1)[0]
    assert 1 <= len(out.tokens) <= 21


def test_eval_command_reproduces_the_build_evaluation(tiny_artifacts, synth_data_dir, tmp_path,
                                                      capsys):
    out = tmp_path / "eval.json"
    built = json.loads(ArtifactPaths(tiny_artifacts).eval_file.read_text())
    args = ["eval", "--artifacts", str(tiny_artifacts), "--data-dir", str(synth_data_dir)]
    assert main([*args, "--users", str(built["users"]), "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert "Recall@10" in printed and "constrained lists" in printed
    # same users (the preset's seed), same greedy lists: the same figures as the build's
    assert result["constrained"] is True and result["exclude_history"] is False
    for name in ("target", "most_popular"):
        assert result[name] == built[name]


def test_eval_command_takes_the_constraint_flags(tiny_artifacts, synth_data_dir, tmp_path,
                                                 capsys):
    args = ["eval", "--artifacts", str(tiny_artifacts), "--data-dir", str(synth_data_dir),
            "--users", "12"]
    assert main([*args, "--unconstrained", "--json", str(tmp_path / "u.json")]) == 0
    assert "unconstrained lists" in capsys.readouterr().out
    free = json.loads((tmp_path / "u.json").read_text())
    assert free["constrained"] is False and free["exclude_history"] is False
    assert main([*args, "--exclude-history", "--json", str(tmp_path / "x.json")]) == 0
    assert "constrained lists, history excluded" in capsys.readouterr().out
    excl = json.loads((tmp_path / "x.json").read_text())
    assert excl["constrained"] is True and excl["exclude_history"] is True
    assert excl["target"]["invalid_item_rate"] == 0.0 and excl["target"]["duplicate_rate"] == 0.0
    assert main([*args, "--unconstrained", "--exclude-history"]) == 2
    assert "--exclude-history needs the constraint" in capsys.readouterr().err


def test_training_precision_follows_the_device(monkeypatch):
    """bfloat16 autocast on CUDA and on CPUs with native bf16 only; the override wins on CPU."""
    import torch

    from padrec_vllm.train import precision

    monkeypatch.delenv(precision.OVERRIDE_ENV, raising=False)
    assert precision.use_bf16("cuda") and precision.use_bf16("cuda:1")
    for native in (True, False):
        monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda native=native: native)
        assert precision.use_bf16("cpu") is native
    a = torch.randn(4, 8)
    for value, dtype in (("1", torch.bfloat16), ("0", torch.float32)):
        monkeypatch.setenv(precision.OVERRIDE_ENV, value)
        with precision.autocast("cpu"):
            assert (a @ a.T).dtype == dtype
    monkeypatch.setenv(precision.OVERRIDE_ENV, "1")
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.use_bf16("cpu")  # the override beats the probe


def test_target_steps_follow_the_dataset(tiny_artifacts, synth_data_dir, tmp_path):
    """``steps_by_dataset`` sets the target's steps for the named dataset only."""
    import shutil
    from dataclasses import replace

    from padrec_vllm.data.s3rec import load_dataset
    from padrec_vllm.pipeline import run_train_target
    from padrec_vllm.presets import get_preset
    from tests.synthetic import NAME

    demo = get_preset("demo")
    assert demo.steps_for("Yelp") > demo.max_steps == demo.steps_for("Beauty")
    preset = replace(get_preset("tiny"), steps_by_dataset=((NAME, 7), ("Other", 500)))
    out = tmp_path / "a"
    shutil.copytree(tiny_artifacts, out, ignore=shutil.ignore_patterns("target", "heads"))
    paths = ArtifactPaths(out)
    report = run_train_target(load_dataset(NAME, synth_data_dir), paths, preset, "cpu")
    assert report["steps"] == 7
