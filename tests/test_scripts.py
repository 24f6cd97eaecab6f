"""Helper scripts under scripts/ that have logic of their own."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_vllm_time_split_counts_each_sample_once_by_its_first_part(tmp_path, capsys):
    split = _load("vllm_time_split")
    raw = tmp_path / "worker.raw"
    raw.write_text(
        # a head forward inside the proposer: counted as the head forward, not the proposer
        "main (a.py:1);SpecDecodeBaseProposer.propose (b.py:2);"
        "EagleLlamaForCausalLM.forward (c.py:3) 6\n"
        "main (a.py:1);SpecDecodeBaseProposer.propose (b.py:2) 2\n"
        "main (a.py:1);MessageQueue.dequeue (d.py:4) 2\n"
        "main (a.py:1);idle (e.py:5) 10\n"
        "not a sample line\n"
    )
    out = tmp_path / "split.json"
    assert split.main([str(raw), "--json", str(out)]) == 0
    shares = json.loads(out.read_text())
    assert shares["samples"] == 20
    assert shares["shares"]["drafter: head forward (compiled graph)"] == 0.3
    assert shares["shares"]["drafter: inputs and attention metadata"] == 0.1
    assert shares["shares"]["waiting for the engine core"] == 0.1
    assert shares["shares"]["other"] == 0.5
    assert "30.0%  drafter: head forward" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no profile"):
        split.main([str(tmp_path / "missing.raw")])
