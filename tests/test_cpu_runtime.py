"""The CPU runtime preload (padrec_vllm/cpu_runtime.py): which libraries, when the command
re-executes itself, and a real `padrec serve --engine vllm` that comes up preloaded."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.local_server import HOST, free_port
from padrec_vllm import cpu_runtime

PADREC = Path(sys.executable).with_name("padrec")


def test_preloaded_environment_prepends_only_what_is_missing():
    libs = ["/usr/lib/libtcmalloc_minimal.so.4", "/venv/lib/libiomp5.so"]
    env = cpu_runtime.preloaded_environment({"PATH": "/bin"}, libs)
    assert env == {"PATH": "/bin", "LD_PRELOAD": ":".join(libs)}
    env = cpu_runtime.preloaded_environment({"LD_PRELOAD": "/other/libtcmalloc_minimal.so.4"},
                                            libs)
    assert env["LD_PRELOAD"] == "/venv/lib/libiomp5.so:/other/libtcmalloc_minimal.so.4"
    assert cpu_runtime.preloaded_environment({"LD_PRELOAD": ":".join(libs)}, libs) is None
    assert cpu_runtime.preloaded_environment({}, []) is None


def test_one_openmp_runtime_and_one_allocator_at_most():
    """A process that imported vLLM's CPU platform has torch's ``libgomp`` in ``LD_PRELOAD``
    (vLLM puts it there) and hands it to the servers it starts: adding ``libiomp5`` made vLLM's
    executor assert at start-up (both runtimes preloaded)."""
    libs = ["/usr/lib/libtcmalloc_minimal.so.4", "/venv/lib/libiomp5.so"]
    gomp = "/venv/torch/lib/libgomp.so.1"
    env = cpu_runtime.preloaded_environment({"LD_PRELOAD": gomp}, libs)
    assert env["LD_PRELOAD"] == f"/usr/lib/libtcmalloc_minimal.so.4:{gomp}"
    jemalloc = "/usr/lib/libjemalloc.so.2"
    env = cpu_runtime.preloaded_environment({"LD_PRELOAD": jemalloc}, libs)
    assert env["LD_PRELOAD"] == f"/venv/lib/libiomp5.so:{jemalloc}"
    assert cpu_runtime.preloaded_environment({"LD_PRELOAD": f"{jemalloc}:{gomp}"}, libs) is None


def test_find_libraries_looks_in_the_environment_prefix(tmp_path):
    (tmp_path / "lib").mkdir()
    assert not any(p.endswith("libiomp5.so") for p in cpu_runtime.find_libraries(str(tmp_path)))
    (tmp_path / "lib" / "libiomp5.so").write_bytes(b"")
    assert cpu_runtime.find_libraries(str(tmp_path))[-1] == str(tmp_path / "lib" / "libiomp5.so")


@pytest.fixture
def execs(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu_runtime.os, "execve", lambda *a: calls.append(a))
    monkeypatch.setattr(cpu_runtime, "vllm_is_cpu_build", lambda: True)
    monkeypatch.setattr(cpu_runtime, "find_libraries", lambda **_: ("/x/libiomp5.so",))
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.delenv(cpu_runtime.ALLOCATOR_SETTING, raising=False)
    monkeypatch.delenv(cpu_runtime.ONEDNN_CACHE_VARIABLE, raising=False)
    monkeypatch.delenv("_PADREC_CPU_PRELOADED", raising=False)
    monkeypatch.delenv(cpu_runtime.SETTING, raising=False)
    monkeypatch.delenv("PADREC_ENGINE", raising=False)
    return calls


def test_reexec_runs_the_same_command_preloaded(execs):
    cpu_runtime.reexec_with_preload(argv=["/venv/bin/padrec", "serve", "--port", "9"])
    cpu_runtime.reexec_with_preload(module="server.main", argv=["/repo/server/main.py"])
    [(exe, argv, env), (_, argv2, _)] = execs
    assert exe == sys.executable
    assert argv == [sys.executable, "-m", "padrec_vllm.cli", "serve", "--port", "9"]
    assert argv2 == [sys.executable, "-m", "server.main"]
    assert env["LD_PRELOAD"] == "/x/libiomp5.so" and env["_PADREC_CPU_PRELOADED"] == "1"
    assert env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "256"


@pytest.mark.parametrize("setting", [
    {cpu_runtime.SETTING: "off"},  # the user turned it off
    {"_PADREC_CPU_PRELOADED": "1"},  # already re-executed: never twice
    {"LD_PRELOAD": "/y/libiomp5.so", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "64"},  # nothing missing
])
def test_reexec_leaves_the_process_alone(execs, monkeypatch, setting):
    for key, value in setting.items():
        monkeypatch.setenv(key, value)
    cpu_runtime.reexec_with_preload(argv=["padrec", "serve"])
    assert execs == []


def test_reexec_needs_a_cpu_build_of_vllm(execs, monkeypatch):
    monkeypatch.setattr(cpu_runtime, "vllm_is_cpu_build", lambda: False)
    cpu_runtime.reexec_with_preload(argv=["padrec", "serve"])
    assert execs == []


def test_allocator_setting_picks_the_library_and_refuses_unknown_names(tmp_path):
    assert cpu_runtime.allocator_setting({}) == cpu_runtime.DEFAULT_ALLOCATOR == "jemalloc"
    setting = {cpu_runtime.ALLOCATOR_SETTING: " TCMalloc "}
    assert cpu_runtime.allocator_setting(setting) == "tcmalloc"
    with pytest.raises(cpu_runtime.AllocatorSettingError, match="PADREC_CPU_ALLOCATOR='glibc'"):
        cpu_runtime.allocator_setting({cpu_runtime.ALLOCATOR_SETTING: "glibc"})
    for allocator, name in cpu_runtime.ALLOCATORS.items():
        found = cpu_runtime.find_libraries(str(tmp_path), allocator=allocator)
        assert all(os.path.basename(p) == name for p in found)  # the system's, when installed


def test_runtime_environment_bounds_onednns_cache_unless_set():
    libs = ["/usr/lib/libjemalloc.so.2"]
    var = cpu_runtime.ONEDNN_CACHE_VARIABLE
    env = cpu_runtime.runtime_environment({}, libs)
    assert env == {"LD_PRELOAD": libs[0], var: str(cpu_runtime.ONEDNN_CACHE_CAPACITY)}
    env = cpu_runtime.runtime_environment({"LD_PRELOAD": libs[0]}, libs)
    assert env == {"LD_PRELOAD": libs[0], var: "256"}
    assert cpu_runtime.runtime_environment({"LD_PRELOAD": libs[0], var: "1024"}, libs) is None


def test_an_unknown_allocator_is_one_line_before_anything_starts(execs, monkeypatch, capsys):
    monkeypatch.setenv(cpu_runtime.ALLOCATOR_SETTING, "mimalloc")
    with pytest.raises(SystemExit) as exit_:
        cpu_runtime.reexec_with_preload(argv=["padrec", "serve"])
    assert str(exit_.value) == ("error: PADREC_CPU_ALLOCATOR='mimalloc': expected one of "
                                "jemalloc, tcmalloc")
    assert execs == []


@pytest.mark.skipif(not cpu_runtime.vllm_is_cpu_build() or len(cpu_runtime.find_libraries()) < 2,
                    reason="needs vLLM's CPU build, libjemalloc and libiomp5 (make setup)")
def test_padrec_serve_vllm_comes_up_preloaded(tiny_artifacts, synth_data_dir, tmp_path):
    """The real console script: the server process (same pid after the exec) carries both
    libraries in LD_PRELOAD and oneDNN's cache bound, and logs the line that says so, before its
    engine starts."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("LD_PRELOAD", "_PADREC_CPU_PRELOADED", cpu_runtime.SETTING,
                        cpu_runtime.ALLOCATOR_SETTING, cpu_runtime.ONEDNN_CACHE_VARIABLE)}
    env.update(PADREC_ARTIFACTS=str(tiny_artifacts), PADREC_DATA_DIR=str(synth_data_dir),
               PADREC_HOST=HOST, PADREC_PORT=str(free_port()), PADREC_CALIBRATION_REQUESTS="0")
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(PADREC), "serve", "--engine", "vllm"], env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while "CPU runtime: LD_PRELOAD=" not in log.read_text() and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text()[-2000:]
            time.sleep(0.2)
        environ = dict(kv.split("=", 1) for kv in
                       Path(f"/proc/{proc.pid}/environ").read_text().split("\0") if "=" in kv)
    finally:
        proc.kill()
        proc.wait()
    preload = environ.get("LD_PRELOAD", "")
    assert "libjemalloc.so.2" in preload and "libiomp5.so" in preload
    assert environ.get(cpu_runtime.ONEDNN_CACHE_VARIABLE) == "256"
    assert "CPU runtime: LD_PRELOAD=" in log.read_text()


def test_in_process_calls_never_reexecute(execs, tmp_path, monkeypatch, capsys):
    """``cli.main(argv)`` (tests, embedding) must not replace the calling process; only the
    process's own command line (``argv`` None) re-executes, and only for vLLM commands."""
    from padrec_vllm import cli

    missing = str(tmp_path / "missing")
    assert cli.main(["serve", "--engine", "vllm", "--artifacts", missing]) == 2
    assert cli.main(["bench", "--engine", "vllm", "--artifacts", missing]) == 2
    assert execs == []
    monkeypatch.setattr(sys, "argv", ["padrec", "bench", "--engine", "reference",
                                      "--artifacts", missing])
    assert cli.main() == 2  # the reference engine: no preload
    assert execs == []
    for argv in (["padrec", "bench", "--engine", "vllm", "--artifacts", missing],
                 ["padrec", "serve", "--artifacts", missing]):
        monkeypatch.setattr(sys, "argv", argv)
        cli.main()  # execve is recorded, not run: the command then goes on and fails
    assert [a[1][3:] for a in execs] == [
        ["bench", "--engine", "vllm", "--artifacts", missing], ["serve", "--artifacts", missing]]
    capsys.readouterr()
