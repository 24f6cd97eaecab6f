"""``padrec_vllm.vllm_plugin.diagnostics``: the root cause of a failed vLLM start carried to the
caller, and the CPU GEMM handler's ``__del__`` under a fake mode finished instead of printed.

The last test starts the server on vLLM with a KV cache too small to start: the engine core fails
in its child process, and ``/readyz`` and the log's last line name why (marker ``vllm``)."""

from __future__ import annotations

import gc
import json
import logging
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("vllm")

from padrec_vllm.vllm_plugin import diagnostics


def test_root_cause_is_the_innermost_exception_in_one_line():
    try:
        try:
            try:
                raise ValueError("no memory for the KV cache\nsecond line")
            except ValueError as inner:
                raise RuntimeError("worker failed") from inner
        except RuntimeError:
            raise RuntimeError("Engine core initialization failed. See root cause above.")
    except RuntimeError as exc:
        assert diagnostics.root_cause(exc) == "ValueError: no memory for the KV cache"
    assert diagnostics.root_cause(KeyError()) == "KeyError"


def test_the_tcmalloc_warning_is_dropped_only_while_jemalloc_is_preloaded(monkeypatch):
    """vLLM's own logger and call: the record reaches a handler unless jemalloc is preloaded;
    the same warning for libiomp and any other record always do."""
    diagnostics.install()
    diagnostics.install()  # idempotent: one filter
    logger = logging.getLogger(diagnostics.CPU_WORKER_LOGGER)
    assert sum(isinstance(f, diagnostics.AllocatorWarningFilter) for f in logger.filters) == 1
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        for preload in ("/usr/lib/libjemalloc.so.2:/venv/lib/libiomp5.so", "/venv/lib/libiomp5.so"):
            monkeypatch.setenv("LD_PRELOAD", preload)
            for name in ("libtcmalloc", "libiomp"):
                logger.warning("%s is not found in LD_PRELOAD. For best performance ...", name)
            logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert [m.split(" is")[0] for m in seen] == [
        "libiomp", "something else", "libtcmalloc", "libiomp", "something else"]


def test_a_watched_start_collects_what_vllm_loggers_log(monkeypatch):
    handler = diagnostics.RootCauseHandler()
    logger = logging.getLogger("vllm.test_diagnostics")
    logger.addHandler(handler)
    try:
        logger.error("no exception: not a root cause")
        with diagnostics.watched_start() as cause:
            assert cause() is None
            try:
                raise OSError("invalid header length")
            except OSError:
                logger.exception("EngineCore failed to start.")
            try:
                raise ValueError("later")
            except ValueError:
                logger.exception("another")
            assert cause() == "OSError: invalid header length"  # the first one
            path = os.environ[diagnostics.ERROR_FILE_ENV]
        assert diagnostics.ERROR_FILE_ENV not in os.environ and not Path(path).exists()
        monkeypatch.setenv(diagnostics.ERROR_FILE_ENV, path)  # a stale name creates no file
        try:
            raise ValueError("after")
        except ValueError:
            logger.exception("outside a watched start")
        assert not Path(path).exists()
    finally:
        logger.removeHandler(handler)


def test_the_handler_refused_under_fake_mode_is_released_not_printed():
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from vllm._custom_ops import CPUDNNLGEMMHandler

    printed, released = [], []
    previous = sys.unraisablehook
    sys.unraisablehook = diagnostics.quiet_unraisable(printed.append)
    try:
        handler = CPUDNNLGEMMHandler()
        handler.dtor, handler.handler_tensor = released.append, torch.tensor(12345)
        with FakeTensorMode():  # as during torch.compile's warm-up
            del handler
            gc.collect()
        assert (printed, released) == ([], [12345])

        def fails(handle):
            raise RuntimeError("a real failure")

        handler = CPUDNNLGEMMHandler()  # the same __del__ failing otherwise: printed
        handler.dtor, handler.handler_tensor = fails, torch.tensor(7)
        del handler
        gc.collect()
        assert len(printed) == 1 and str(printed[0].exc_value) == "a real failure"

        class Other:
            def __del__(self):
                raise AssertionError("someone else's")

        Other()
        gc.collect()
        assert len(printed) == 2 and str(printed[1].exc_value) == "someone else's"
    finally:
        sys.unraisablehook = previous


def test_register_installs_the_diagnostics_once():
    from padrec_vllm.vllm_plugin import register

    register()
    register()
    hook = sys.unraisablehook
    assert getattr(hook, "padrec_wrapped", None) is not None
    assert not hasattr(hook.padrec_wrapped, "padrec_wrapped")
    handlers = [h for h in logging.getLogger("vllm").handlers
                if isinstance(h, diagnostics.RootCauseHandler)]
    assert len(handlers) == 1


@pytest.mark.vllm
def test_a_failed_vllm_start_names_its_root_cause(tiny_artifacts, synth_data_dir, tmp_path):
    """vLLM's engine core cannot start (a KV cache of 10 KiB): ``/readyz`` and the server log's
    last line carry vLLM's own error, not "See root cause above"."""
    from benchmarks.local_server import HOST, free_port, process_group

    port = free_port()
    repo = Path(__file__).resolve().parents[1]
    base = {k: v for k, v in os.environ.items() if k != "VLLM_CPU_KVCACHE_SPACE"}  # wins on CPU
    env = {**base, "PADREC_ARTIFACTS": str(tiny_artifacts), "PADREC_ENGINE": "vllm",
           "PADREC_DATA_DIR": str(synth_data_dir), "PADREC_CALIBRATION_REQUESTS": "0",
           "PADREC_VLLM_KV_CACHE_GIB": "0.00001", "PADREC_HOST": HOST, "PADREC_PORT": str(port),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")]))}
    log = tmp_path / "server.log"
    url = f"http://{HOST}:{port}/readyz"
    with process_group([sys.executable, "-m", "server.main"], log, env) as proc:
        deadline, body = time.monotonic() + 600, {}
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                urllib.request.urlopen(url, timeout=5)
                raise AssertionError("the server became ready")
            except urllib.error.HTTPError as exc:
                body = json.loads(exc.read())
                if body["status"] == "failed":
                    break
            except OSError:
                pass
            time.sleep(1)
        lines = log.read_text().splitlines()
    cause = "ValueError: No available memory for the cache blocks"
    assert body["status"] == "failed" and cause in body["error"]
    assert "See root cause above" not in body["error"]
    own = [line for line in lines if not line.startswith("INFO:")]  # without uvicorn's access log
    assert "ERROR padrec.server: engine failed to start: vLLM failed to start" in own[-1]
    assert cause in own[-1]
