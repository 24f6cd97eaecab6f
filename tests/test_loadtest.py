"""loadtests/ and benchmarks/: the runner's arithmetic, the one local-server helper, then a short
headless locust run against the real server (tiny preset, reference engine, loopback) that must
have zero failures, a minimal sweep, and the server-overhead benchmark."""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import dockerfile
import pytest
from deploytools import REPO, runner

from benchmarks import local_server as helper

RUN = [sys.executable, str(REPO / "loadtests" / "run.py")]


def result(label: str, users: int, rps: float, p50: float, **kw):
    fields = {"duration_s": 5.0, "requests": int(rps * 5), "failures": 0, "p95_ms": p50 * 2,
              "p99_ms": p50 * 3, "mean_ms": p50, "tau": 2.0, "acceptance": 0.5,
              "decode_ms_per_token": 1.0}
    return runner().RunResult(label=label, users=users, rps=rps, p50_ms=p50, **{**fields, **kw})


def test_parse_duration():
    parse = runner().parse_duration
    assert parse("30s") == 30 and parse("2m") == 120 and parse("1h30m") == 5400 and parse("7") == 7
    for bad in ("", "0s", "10x", "m"):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_server_figures_are_deltas_of_the_counters():
    names = runner().SERVER_COUNTERS
    before = dict.fromkeys(names, 100.0)
    after = {**before, "padrec_decode_tokens_total": 130.0, "padrec_target_forwards_total": 110.0,
             "padrec_draft_tokens_total": 130.0, "padrec_accepted_tokens_total": 115.0,
             "padrec_decode_seconds_total": 100.3}
    figures = runner().server_figures(before, after)
    assert figures["tau"] == pytest.approx(3.0)
    assert figures["acceptance"] == pytest.approx(0.5)
    assert figures["decode_ms_per_token"] == pytest.approx(10.0)
    assert runner().server_figures(before, before) == {"tau": None, "acceptance": None,
                                                       "decode_ms_per_token": None}
    assert runner().server_figures(None, after)["tau"] is None


def test_sweep_table_gives_speedup_per_concurrency():
    rows = [result("spec", 1, 10.0, 100.0), result("plain", 1, 5.0, 200.0),
            result("spec", 4, 30.0, 120.0), result("plain", 4, 20.0, 180.0)]
    table = runner().sweep_markdown(rows, "python loadtests/run.py sweep ...", "CPU, tiny")
    assert "Command: `python loadtests/run.py sweep ...`" in table and "CPU, tiny" in table
    assert "| 1 | 2.00x | 2.00x |" in table
    assert "| 4 | 1.50x | 1.50x |" in table
    assert table.count("speculation on") == 2 and table.count("speculation off") == 2


def test_the_local_server_helper_is_written_once():
    """Free port, readiness poll and process-group shutdown live in benchmarks/local_server.py;
    the load-test runner, the overhead benchmark and the tests use it."""
    assert runner().local_server is helper.local_server and runner().wait_ready is helper.wait_ready
    from benchmarks import server_overhead

    assert server_overhead.local_server is helper.local_server
    pattern = re.compile(r"killpg|start_new_session|socket\.socket\(|urlopen\(.*/readyz")
    sources = [p for folder in ("benchmarks", "loadtests", "server", "padrec_vllm", "tests")
               for p in (REPO / folder).rglob("*.py") if p != Path(__file__)]
    holders = {p.relative_to(REPO).as_posix() for p in sources if pattern.search(p.read_text())}
    assert holders == {"benchmarks/local_server.py"}


def test_the_helper_reports_a_server_that_exits(tmp_path):
    command = [sys.executable, "-c", "raise SystemExit(3)"]
    with pytest.raises(RuntimeError, match=r"exited with status 3 .*server log: "):
        with helper.local_server(tmp_path, tmp_path / "dead.log", command=command):
            pass


@pytest.fixture(scope="module")
def server(tiny_artifacts, synth_data_dir, tmp_path_factory):
    log = tmp_path_factory.mktemp("lt-server") / "server.log"
    env = {"PADREC_ENGINE": "reference", "PADREC_DATA_DIR": str(synth_data_dir),
           "PADREC_CALIBRATION_REQUESTS": "0"}
    with helper.local_server(tiny_artifacts, log, env=env, ready_timeout_s=600) as url:
        yield url


def test_docker_healthcheck_command_passes_against_the_server(server):
    instructions = dockerfile.parse_file(str(REPO / "Dockerfile"))
    (health,) = [i for i in instructions if i.cmd == "HEALTHCHECK"]
    assert health.value[0] == "CMD"
    cmd = [sys.executable if health.value[1] == "python3" else health.value[1], *health.value[2:]]
    port = server.rsplit(":", 1)[1]
    assert subprocess.run(cmd, env={**os.environ, "PADREC_PORT": port}, timeout=30,
                          check=False).returncode == 0


def test_locust_smoke_has_zero_failures(server, synth_data_dir, tmp_path):
    from synthetic import NAME

    out = subprocess.run(
        RUN + ["run", "--host", server, "--users", "2", "--duration", "30s", "--k", "3",
               "--dataset", NAME, "--data-dir", str(synth_data_dir), "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO, check=False)
    assert out.returncode == 0, out.stdout + out.stderr + (tmp_path / "run-u2.log").read_text()
    (report,) = json.loads((tmp_path / "report.json").read_text())
    assert report["failures"] == 0 and report["requests"] >= 1
    assert 0 < report["p50_ms"] <= report["p95_ms"] <= report["p99_ms"]
    # the tiny head gets some drafts accepted, so some forwards emit more than one token
    assert report["tau"] > 1.0 and 0.0 < report["acceptance"] <= 1.0
    assert "| run | 2 |" in (tmp_path / "report.md").read_text()
    assert (tmp_path / "run-u2.html").is_file()


def test_sweep_runs_speculation_on_and_off(tiny_artifacts, synth_data_dir, tmp_path):
    out = subprocess.run(
        RUN + ["sweep", "--artifacts", str(tiny_artifacts), "--engine", "reference",
               "--users", "1", "--duration", "20s", "--k", "3", "--data-dir", str(synth_data_dir),
               "--env", "PADREC_CALIBRATION_REQUESTS=0", "--ready-timeout", "600",
               "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=REPO, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    results = json.loads((tmp_path / "sweep.json").read_text())
    assert [(r["label"], r["users"]) for r in results] == [("spec", 1), ("plain", 1)]
    assert all(r["failures"] == 0 and r["requests"] >= 1 for r in results)
    plain = results[1]
    assert plain["acceptance"] is None, "no drafts without speculation"
    assert "| 1 |" in (tmp_path / "sweep.md").read_text()


def test_server_overhead_benchmark_runs(tiny_artifacts, tmp_path):
    from benchmarks.server_overhead import run

    res = run(tiny_artifacts, "null", requests=20, k=5, history=3, warmup=5,
              log_path=tmp_path / "server.log")
    assert res["requests"] == 20 and 0 < res["rtt_p50_ms"] and res["engine_p50_ms"] >= 0
    assert res["overhead_p50_ms"] <= res["rtt_p50_ms"]
    assert 0 < res["in_server_overhead_p50_ms"] <= res["in_server_overhead_p90_ms"]
    assert res["overhead_p50_ms"] <= res["overhead_p90_ms"] <= res["overhead_p99_ms"]
