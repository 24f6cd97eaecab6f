"""A server (or any helper process) on loopback for a benchmark, a load test or a test: the one
place for the free port, the readiness poll and the process-group shutdown.

    with local_server(artifacts, log_path, env={"PADREC_ENGINE": "reference"}) as url:
        ...  # url = "http://127.0.0.1:<port>", answering 200 on /readyz

Users: ``loadtests/run.py``, ``benchmarks/server_overhead.py``, ``tests/test_loadtest.py`` and
``tests/test_prometheus.py``. Dev-only (not in the wheel); the standard library only.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HOST = "127.0.0.1"
SERVER_COMMAND = (sys.executable, "-m", "server.main")  # settings from PADREC_* only


def free_port() -> int:
    """A TCP port free on loopback now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> dict:
    """Poll ``url/readyz`` until 200 and return its body; RuntimeError when ``proc`` exits, the
    engine reports ``failed``, or ``timeout_s`` runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as r:
                return json.load(r)
        except urllib.error.HTTPError as exc:
            if exc.code != 503:
                raise
            body = json.loads(exc.read() or b"{}")
            if body.get("status") == "failed":
                raise RuntimeError(f"server engine failed: {body.get('error')}") from None
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.5)
    raise RuntimeError(f"server at {url} not ready after {timeout_s:.0f} s")


@contextlib.contextmanager
def process_group(
    command: Sequence[str], log_path: Path, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen]:
    """``command`` in a new session (its own process group), output to ``log_path``; on exit
    SIGTERM to the whole group, SIGKILL after 60 s."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            list(command),
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen, timeout_s: float = 60.0) -> None:
    """SIGTERM the process group of ``proc`` (a session leader), SIGKILL after ``timeout_s``."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@contextlib.contextmanager
def local_server(
    artifacts: Path,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 900.0,
    command: Sequence[str] = SERVER_COMMAND,
) -> Iterator[str]:
    """The server (``python -m server.main`` unless ``command`` says otherwise) on a free
    loopback port, configured by ``PADREC_*`` (``env`` on top of this process's environment);
    yields its base URL once ``/readyz`` answers 200, stops its process group after.

    The repository root leads the child's ``PYTHONPATH``, so ``command`` may run a module of
    this checkout (``benchmarks.*``)."""
    with local_server_process(artifacts, log_path, env=env, ready_timeout_s=ready_timeout_s,
                              command=command) as (url, _proc):
        yield url


@contextlib.contextmanager
def local_server_process(
    artifacts: Path,
    log_path: Path,
    *,
    env: dict[str, str] | None = None,
    ready_timeout_s: float = 900.0,
    command: Sequence[str] = SERVER_COMMAND,
) -> Iterator[tuple[str, subprocess.Popen]]:
    """``local_server`` that also yields the server's process (for its pid, e.g. to sample
    memory): ``(url, proc)``."""
    port = free_port()
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    full_env = {
        **os.environ,
        "PYTHONPATH": path,
        "PADREC_ARTIFACTS": str(artifacts),
        "PADREC_HOST": HOST,
        "PADREC_PORT": str(port),
        **(env or {}),
    }
    url = f"http://{HOST}:{port}"
    with process_group(command, log_path, full_env) as proc:
        try:
            wait_ready(url, ready_timeout_s, proc)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc} (server log: {log_path})") from None
        yield url, proc
