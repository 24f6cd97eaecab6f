"""The server as a process on loopback, through real HTTP clients: oversized bodies get their 413
with clients that write the whole body before they read (urllib, httpx), whatever the size, and
the server's memory stays bounded while it throws them away."""

from __future__ import annotations

import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest

from benchmarks.local_server import HOST, free_port, process_group, wait_ready

MIB = 1 << 20
SIZES_MIB = (1.5, 8, 32)


@pytest.fixture(scope="module")
def server(tiny_artifacts, synth_data_dir, tmp_path_factory):
    """``python -m server.main`` on the tiny build (reference engine, no calibration):
    ``(url, pid)``."""
    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH")) if p),
        "PADREC_ARTIFACTS": str(tiny_artifacts),
        "PADREC_DATA_DIR": str(synth_data_dir),
        "PADREC_ENGINE": "reference",
        "PADREC_CALIBRATION_REQUESTS": "0",
        "PADREC_HOST": HOST,
        "PADREC_PORT": str(port),
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path_factory.mktemp("http") / "server.log"
    with process_group([sys.executable, "-m", "server.main"], log, env) as proc:
        url = f"http://{HOST}:{port}"
        wait_ready(url, timeout_s=300, proc=proc)
        yield url, proc.pid


def body(size_mib: float) -> bytes:
    return b'{"history": [1], "k": 3, "pad": "' + b" " * int(size_mib * MIB) + b'"}'


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def post_urllib(url: str, data: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(url + "/recommend", data=data, method="POST",
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.parametrize("size", SIZES_MIB)
def test_oversized_body_is_413_with_urllib(server, size):
    url, _ = server
    for _ in range(2):  # and again: the server is still there, answering
        status, answer = post_urllib(url, body(size))
        assert (status, answer["error"]) == (413, "body_too_large")


@pytest.mark.parametrize("size", SIZES_MIB)
def test_oversized_body_is_413_with_httpx(server, size):
    url, _ = server
    with httpx.Client(timeout=60) as client:
        for _ in range(2):  # on the same connection when the body was read to its end
            r = client.post(url + "/recommend", content=body(size),
                            headers={"content-type": "application/json"})
            assert r.status_code == 413 and r.json()["error"] == "body_too_large"
        r = client.post(url + "/recommend", json={"history": [1, 2], "k": 3})
        assert r.status_code == 200 and len(r.json()["items"]) == 3


def test_oversized_chunked_body_is_413_with_httpx(server):
    """No Content-Length: the limit is found while reading, and the rest is read and dropped."""
    url, _ = server

    def chunks():
        for _ in range(16):
            yield b" " * (MIB // 2)

    with httpx.Client(timeout=60) as client:
        r = client.post(url + "/recommend", content=chunks())
        assert r.status_code == 413 and r.json()["error"] == "body_too_large"


def test_a_body_beyond_the_drain_bound_is_refused_at_once(server):
    """Declared larger than PADREC_DRAIN_BODY_BYTES (64 MiB): the 413 comes before any body is
    read, with Connection: close; as for a client that waits for 100 Continue."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1])
    import socket

    for extra in ("", "Expect: 100-continue\r\n"):
        with socket.create_connection((HOST, port), timeout=30) as s:
            s.sendall(f"POST /recommend HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      f"Content-Length: {1 << 30}\r\n{extra}\r\n".encode())
            answer = s.recv(65536).decode()
        head = answer.split("\r\n\r\n")[0].lower()
        assert head.startswith("http/1.1 413") and "connection: close" in head


def test_discarded_bodies_leave_memory_bounded(server):
    """The server's resident memory, sampled every 5 ms while it reads three 32-MiB bodies,
    stays within 16 MiB of where it was (the bodies are thrown away as they come)."""
    import threading
    import time

    url, pid = server
    post_urllib(url, body(1.5))
    before, peak, done = rss_kib(pid), 0, threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kib(pid))
            time.sleep(0.005)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        for _ in range(3):
            assert post_urllib(url, body(32))[0] == 413
    finally:
        done.set()
        sampler.join()
    grown_mib = (peak - before) / 1024
    assert grown_mib < 16, f"the server's memory grew by {grown_mib:.0f} MiB"
