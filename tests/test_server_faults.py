"""Faults the server must survive, on a real process over loopback (reference engine, tiny build):
clients that vanish mid-request leave it answering with its in-flight gauge back at 0, and
SIGTERM with requests in flight lets every one of them finish before the process exits."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from benchmarks.local_server import HOST, free_port, process_group, wait_ready
from padrec_vllm.catalog.catalog import Catalog

IN_FLIGHT = "padrec_in_flight_requests"


def server_env(art: Path, data: Path, port: int, **extra: str) -> dict[str, str]:
    repo = Path(__file__).resolve().parents[1]
    return {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p),
        "PADREC_ARTIFACTS": str(art), "PADREC_DATA_DIR": str(data), "PADREC_ENGINE": "reference",
        "PADREC_CALIBRATION_REQUESTS": "0", "PADREC_HOST": HOST, "PADREC_PORT": str(port),
        "OMP_NUM_THREADS": "1", **extra,
    }


def payload(art: Path, k: int) -> bytes:
    items = sorted(Catalog.load(art).item_to_sid)
    return json.dumps({"history": items[:5], "k": k}).encode()


def post(url: str, data: bytes) -> int:
    req = urllib.request.Request(url + "/recommend", data=data, method="POST",
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return r.status


def in_flight(url: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=30).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines()
               if line.startswith(IN_FLIGHT))


def test_vanished_clients_leave_the_server_answering(tiny_artifacts, synth_data_dir, tmp_path):
    port = free_port()
    url = f"http://{HOST}:{port}"
    body = payload(tiny_artifacts, 20)
    head = (f"POST /recommend HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    env = server_env(tiny_artifacts, synth_data_dir, port)
    with process_group([sys.executable, "-m", "server.main"], tmp_path / "server.log", env) as p:
        wait_ready(url, timeout_s=300, proc=p)
        for i in range(40):  # send a whole request (or half of one) and go away
            with socket.create_connection((urlsplit(url).hostname, port), timeout=10) as s:
                s.sendall(head + (body if i % 2 else body[: len(body) // 2]))
        deadline = time.monotonic() + 120
        while in_flight(url) > 0 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert in_flight(url) == 0
        assert post(url, body) == 200
        assert p.poll() is None


def test_sigterm_lets_requests_in_flight_finish(tiny_artifacts, synth_data_dir, tmp_path):
    """Eight long requests queued one at a time (batch 1), SIGTERM while they are in flight:
    all eight are answered 200 and the process exits (0, or by the re-raised SIGTERM)."""
    port = free_port()
    url = f"http://{HOST}:{port}"
    body = payload(tiny_artifacts, 50)
    env = server_env(tiny_artifacts, synth_data_dir, port, PADREC_MAX_BATCH_SIZE="1")
    with process_group([sys.executable, "-m", "server.main"], tmp_path / "server.log", env) as p:
        wait_ready(url, timeout_s=300, proc=p)
        done: list[tuple[int, float]] = []
        errors: list[BaseException] = []

        def one() -> None:
            try:
                done.append((post(url, body), time.monotonic()))
            except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
                errors.append(exc)

        threads = [threading.Thread(target=one) for _ in range(8)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while in_flight(url) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert in_flight(url) >= 2, "the requests were not in flight together"
        sent = time.monotonic()
        os.kill(p.pid, signal.SIGTERM)
        for t in threads:
            t.join(timeout=300)
        # uvicorn drains, then re-raises the signal to the default handler (exit -15)
        assert p.wait(timeout=120) in (0, -signal.SIGTERM)
    assert not errors and [status for status, _ in done] == [200] * 8
    assert any(at > sent for _, at in done), "no request was still in flight at SIGTERM"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch):
    monkeypatch.setenv("no_proxy", "*")  # loopback only
