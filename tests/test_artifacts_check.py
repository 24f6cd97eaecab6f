"""The artifacts check (``padrec_vllm.artifacts_check``): broken copies of the tiny build are
refused before any engine starts, by ``padrec serve`` (both engines), ``padrec bench`` (both
engines) and ``padrec eval``, in one line that names the file; the intact build passes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from padrec_vllm import cli
from padrec_vllm.artifacts_check import check_artifacts
from padrec_vllm.errors import UserError

PADREC = Path(sys.executable).parent / "padrec"


def _truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def _edit_config(path: Path, edit) -> None:
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def _other_vocabulary(config: dict) -> None:  # as the issue found it: + 7 ids, slot table too
    config["vocab_size"] += 7
    config["padrec_slot_of_token"] += [config["padrec_num_slots"] - 1] * 7


def _other_slot(config: dict) -> None:
    table = config["padrec_slot_of_token"]
    table[7] = (table[7] + 1) % config["padrec_num_slots"]


HEAD = "heads/padrec/config.json"
# name -> (how the copy is broken, the file the one line must name, text it must contain)
BROKEN = {
    "truncated_head_weights": (
        lambda d: _truncate(d / "heads/padrec/model.safetensors"),
        "heads/padrec/model.safetensors", "truncated"),
    "truncated_target_weights": (
        lambda d: _truncate(d / "target/model.safetensors"),
        "target/model.safetensors", "truncated"),
    "head_of_another_vocabulary": (
        lambda d: _edit_config(d / HEAD, _other_vocabulary), HEAD, "vocab_size is 63"),
    "head_of_another_hidden_size": (
        lambda d: _edit_config(d / HEAD, lambda c: c.update(hidden_size=96)), HEAD,
        "hidden_size is 96"),
    "slot_table_not_the_catalogs": (
        lambda d: _edit_config(d / HEAD, _other_slot), HEAD, "slot table gives token 7"),
    "missing_tokenizer": (
        lambda d: (d / "target/tokenizer.json").unlink(), "target/tokenizer.json",
        "missing tokenizer file"),
}


@pytest.fixture(scope="module")
def broken(tiny_artifacts, tmp_path_factory) -> dict[str, Path]:
    """One broken copy of the tiny build per ``BROKEN`` entry."""
    root = tmp_path_factory.mktemp("broken")
    copies = {}
    for name, (breaks, _, _) in BROKEN.items():
        copies[name] = root / name
        shutil.copytree(tiny_artifacts, copies[name])
        breaks(copies[name])
    return copies


def test_the_intact_build_passes(tiny_artifacts):
    layout = check_artifacts(tiny_artifacts, heads=["padrec", "eagle"])
    assert layout.vocab_size == json.loads((tiny_artifacts / "target/config.json").read_text())[
        "vocab_size"]


@pytest.mark.parametrize("name", BROKEN)
def test_a_broken_build_is_one_line_naming_the_file(name, broken):
    _, file, text = BROKEN[name]
    with pytest.raises(UserError) as err:
        check_artifacts(broken[name], heads=["padrec"])
    message = str(err.value)
    assert str(broken[name] / file) in message and text in message
    assert "\n" not in message


def test_more_mismatches(tiny_artifacts, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art)

    def refused(match: str, heads=("padrec", "eagle")):
        with pytest.raises(UserError, match=match):
            check_artifacts(art, heads=heads)

    head = art / HEAD
    original = head.read_text()
    _edit_config(head, lambda c: c.update(padrec_kind="eagle"))
    refused("a eagle head under the name padrec")
    head.write_text(original)
    _edit_config(head, lambda c: c.update(padrec_num_slots=7))
    refused("padrec_num_slots is 7, the token layout .* has 6")
    head.write_text(original)
    _edit_config(head, lambda c: c.pop("padrec_slot_of_token"))
    refused("no padrec_slot_of_token")
    head.write_text(original)
    _edit_config(head, lambda c: c.update(intermediate_size=96))  # config and weights disagree
    refused(r"model.safetensors: layers.0.mlp.gate_proj.weight is \[128, 64\], its config .* "
            r"needs \[96, 64\]")
    head.write_text(original)
    weights = art / "heads/eagle/model.safetensors"
    weights.write_bytes(weights.read_bytes() + b"\0" * 8)
    refused("eagle/model.safetensors: trailing bytes")
    (art / "target/tokenizer.json").write_text("{")
    refused("corrupt .*target/tokenizer.json")
    shutil.copy(tiny_artifacts / "target/tokenizer.json", art / "target/tokenizer.json")
    _edit_config(art / "target/config.json", lambda c: c.update(vocab_size=60))
    refused("target/config.json: vocab_size is 60, the token layout .* has 56", heads=())
    shutil.copy(tiny_artifacts / "target/config.json", art / "target/config.json")
    catalog = art / "catalog.jsonl"
    lines = catalog.read_text().splitlines()
    catalog.write_text("\n".join(lines[:3] + [lines[3][:20]]) + "\n")
    refused("catalog.jsonl line 4: ")
    catalog.write_text("\n".join(lines + [lines[0]]) + "\n")
    refused(f"catalog.jsonl line {len(lines) + 1}: item .* listed twice")


def test_weight_shapes_are_the_state_dict_of_every_variant():
    from padrec_vllm.model.config import HEAD_VARIANTS, HeadConfig
    from padrec_vllm.model.head import DraftHead
    from padrec_vllm.model.head_checkpoint import weight_shapes

    for variant in HEAD_VARIANTS.values():
        config = HeadConfig(variant.kind, hidden_size=16, intermediate_size=24,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                            rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
                            vocab_size=20, num_slots=4, num_steps=3, **variant.switches())
        head = DraftHead(config, [0] * 20 if config.has_item_emb else None)
        got = {k: tuple(v.shape) for k, v in head.state_dict().items()}
        assert got == weight_shapes(config)


# --------------------------------------------------------------------------- through the CLI


@pytest.fixture
def nothing_past_the_check(monkeypatch):
    """Whatever each command does after the artifacts check (start an engine, load a dataset)
    fails the test instead."""
    import padrec_vllm.bench.setup
    import padrec_vllm.data.s3rec
    import server.main

    def past(*args, **kwargs):
        raise AssertionError("the run went past the artifacts check")

    monkeypatch.setattr(server.main, "create_app", past)
    monkeypatch.setattr(padrec_vllm.bench.setup, "get_preset", past)
    monkeypatch.setattr(padrec_vllm.data.s3rec, "load_dataset", past)


COMMANDS = {
    "serve_reference": ["serve", "--engine", "reference", "--artifacts"],
    "serve_vllm": ["serve", "--engine", "vllm", "--artifacts"],
    "bench_reference": ["bench", "--engine", "reference", "--artifacts"],
    "bench_vllm": ["bench", "--engine", "vllm", "--methods", "ar,padrec", "--artifacts"],
    "eval": ["eval", "--artifacts"],
}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("name", BROKEN)
def test_every_command_refuses_a_broken_build(name, command, broken, nothing_past_the_check,
                                              capsys):
    _, file, text = BROKEN[name]
    if command == "eval" and file.startswith("heads/"):  # eval reads no head: it runs
        with pytest.raises(AssertionError, match="past the artifacts check"):
            cli.main([*COMMANDS[command], str(broken[name])])
        return
    assert cli.main([*COMMANDS[command], str(broken[name])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("padrec: error: ") and err.count("\n") == 1
    assert str(broken[name] / file) in err and text in err


@pytest.mark.parametrize(
    "argv,env",
    [
        ([str(PADREC), "serve", "--engine", "vllm"], {}),
        ([sys.executable, "-m", "server.main"], {"PADREC_ENGINE": "reference"}),
    ],
    ids=["padrec_serve_vllm", "python_m_server_main"],
)
def test_a_server_process_refuses_in_one_line(argv, env, broken):
    """As a user runs it: the process exits 2 at once, its output one line, no traceback."""
    art = broken["truncated_head_weights"]
    repo = Path(__file__).resolve().parents[1]
    full_env = {**os.environ, "PADREC_ARTIFACTS": str(art), "OMP_NUM_THREADS": "1",
                "PYTHONPATH": os.pathsep.join(filter(None, [str(repo),
                                                            os.environ.get("PYTHONPATH")])),
                **env}
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=full_env,
                          check=False)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"{art}/heads/padrec/model.safetensors: truncated" in done.stderr
