"""Start-up: server settings from the environment, the start-up check, ``serve()``, and
``padrec serve``, which reaches the server only through the ``padrec.commands`` entry point."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import urllib.request
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from benchmarks.local_server import local_server, wait_ready
from padrec_vllm import cli
from padrec_vllm.errors import UserError
from server import Settings
from server.checks import check

PADREC = Path(sys.executable).parent / "padrec"  # the installed console script


def test_settings_from_environment(monkeypatch, tiny_artifacts):
    monkeypatch.setenv("PADREC_ARTIFACTS", str(tiny_artifacts))
    monkeypatch.setenv("PADREC_ENGINE", "reference")
    monkeypatch.setenv("PADREC_SPECULATIVE", "false")
    monkeypatch.setenv("PADREC_MAX_IN_FLIGHT", "3")
    monkeypatch.setenv("PADREC_VLLM_ARGS", '{"max_num_batched_tokens": 512}')
    s = Settings()
    assert (s.artifacts, s.engine, s.speculative, s.max_in_flight) == (
        Path(tiny_artifacts),
        "reference",
        False,
        3,
    )
    assert s.vllm_args == {"max_num_batched_tokens": 512}
    assert Settings(port=9000).port == 9000  # arguments override the environment
    monkeypatch.setenv("PADREC_ENGINE", "tensorrt")
    with pytest.raises(Exception, match="engine"):
        Settings()


def test_check_rejects_unusable_setups(tmp_path, tiny_artifacts):
    with pytest.raises(UserError, match="not an artifacts directory"):
        check(Settings(artifacts=tmp_path))
    with pytest.raises(UserError, match="max_history"):
        check(Settings(artifacts=tiny_artifacts, max_history=500))
    import shutil

    art = tmp_path / "art"
    shutil.copytree(tiny_artifacts, art, ignore=shutil.ignore_patterns("padrec"))
    with pytest.raises(UserError, match="no padrec head"):
        check(Settings(artifacts=art))
    check(Settings(artifacts=art, head="eagle"))
    check(Settings(artifacts=art, speculative=False))
    (art / "target" / "config.json").unlink()
    with pytest.raises(UserError, match="no target model in .*run `padrec build`"):
        check(Settings(artifacts=art, speculative=False))


def test_serve_fails_fast_on_bad_settings(tmp_path, monkeypatch):
    from server.main import serve

    monkeypatch.delenv("PADREC_ARTIFACTS", raising=False)
    with pytest.raises(UserError, match="not an artifacts directory"):
        serve(tmp_path, port=0)
    with pytest.raises(UserError, match="PADREC_PORT"):
        serve(tmp_path, port=70000)
    with pytest.raises(UserError, match="PADREC_ARTIFACTS: Field required"):
        serve()


# --------------------------------------------------------------------------- the padrec serve seam


def test_serve_is_registered_through_the_entry_point_group():
    (ep,) = [e for e in entry_points(group=cli.COMMANDS_GROUP) if e.name == "serve"]
    assert ep.value == "server.cli:command"
    tree = ast.parse(Path(cli.__file__).read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert not {m for m in imported if m == "server" or m.startswith("server.")}


SERVE_HELP = """\
usage: padrec serve [-h] [--artifacts ARTIFACTS] [--host HOST] [--port PORT]
                    [--engine {vllm,reference}]

options:
  -h, --help            show this help message and exit
  --artifacts ARTIFACTS
                        artifacts directory (default: $PADREC_ARTIFACTS)
  --host HOST           bind address (default: $PADREC_HOST or 127.0.0.1)
  --port PORT           port (default: $PADREC_PORT or 8000)
  --engine {vllm,reference}
                        default: $PADREC_ENGINE or vllm
"""


def test_padrec_serve_help():
    def run(*argv: str) -> str:
        return subprocess.run([PADREC, *argv], capture_output=True, text=True, check=True,
                              env={**os.environ, "COLUMNS": "80"}).stdout

    assert run("serve", "--help") == SERVE_HELP
    assert "{data,prepare,build,eval,train-heads,bench,serve}" in run("--help")


@pytest.mark.parametrize(
    "argv,line",
    [
        (["--artifacts", "{tmp}", "--engine", "reference"],
         "padrec: error: not an artifacts directory: {tmp} "
         "(missing build.json; run `padrec build`)"),
        (["--port", "0"],
         "padrec serve: argument --port: expected a positive integer, got 0 (see --help)"),
        (["--engine", "foo"],
         "padrec serve: argument --engine: invalid choice: 'foo' (choose from 'vllm', "
         "'reference') (see --help)"),
        ([], "padrec: error: invalid server settings: PADREC_ARTIFACTS: Field required"),
        (["--artifacts", "{tmp}", "--port", "70000"],
         "padrec: error: invalid server settings: PADREC_PORT: Input should be less than or "
         "equal to 65535"),
    ],
)
def test_padrec_serve_errors_are_one_line(argv, line, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PADREC_ARTIFACTS", raising=False)
    argv = [a.format(tmp=tmp_path) for a in argv]
    assert cli.main(["serve", *argv]) == 2
    assert capsys.readouterr().err == line.format(tmp=tmp_path) + "\n"


def test_padrec_serve_passes_its_flags_to_serve(monkeypatch):
    import server.main

    calls = []
    monkeypatch.setattr(server.main, "serve", lambda *a, **kw: calls.append((a, kw)))
    assert cli.main(["serve", "--artifacts", "A", "--engine", "reference", "--port", "8123"]) == 0
    assert cli.main(["serve", "--host", "0.0.0.0"]) == 0
    assert calls == [(("A", None, 8123), {"engine": "reference"}), ((None, "0.0.0.0", None), {})]


def test_a_command_entry_point_must_add_its_subcommand(monkeypatch):
    class Silent:  # an entry point whose register adds no parser
        name, value = "silent", "somewhere:register"

        def load(self):
            return lambda subparsers: (lambda args: None)

    monkeypatch.setattr(cli, "entry_points", lambda group: [Silent()])
    with pytest.raises(RuntimeError, match="must add a 'silent' subcommand"):
        cli.build_parser()


def test_padrec_serve_serves(tiny_artifacts, synth_data_dir, tmp_path):
    """The console script, through the entry point, up to a ready server and an answer."""
    env = {"PADREC_DATA_DIR": str(synth_data_dir), "PADREC_CALIBRATION_REQUESTS": "0"}
    command = [str(PADREC), "serve", "--engine", "reference"]
    with local_server(tiny_artifacts, tmp_path / "serve.log", env=env, command=command,
                      ready_timeout_s=300) as url:
        ready = wait_ready(url, timeout_s=10)  # already ready: its /readyz body
        assert ready["engine"] == "reference" and ready["model"] == "Synth/tiny"
        req = urllib.request.Request(url + "/recommend", method="POST",
                                     data=json.dumps({"history": [1, 2, 3], "k": 4}).encode(),
                                     headers={"content-type": "application/json"})
        body = json.load(urllib.request.urlopen(req, timeout=60))
        assert len(body["items"]) == 4 and body["engine"] == "reference"
