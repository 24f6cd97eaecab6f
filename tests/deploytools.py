"""Helpers of the deployment tests (test_deploy, test_prometheus, test_loadtest): where the
validators are, the load-test runner module, and the metric names the server exports."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    """Path of a validator installed by `make setup` (venv first, then PATH); fails if missing."""
    for candidate in (BIN / name, shutil.which(name)):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(f"{name} not found: `make setup` installs it (see the Makefile)")


@cache
def runner():
    """loadtests/run.py as a module (loadtests/ is scripts, not a package)."""
    spec = importlib.util.spec_from_file_location("loadtests_run", REPO / "loadtests" / "run.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


@cache
def server_sample_names() -> frozenset[str]:
    """Every sample name the server's own registry can export (counters with _total, ...)."""
    from server.metrics import ServerMetrics

    suffixes = {"counter": ("_total", "_created"),
                "histogram": ("_bucket", "_count", "_sum", "_created"),
                "gauge": ("",), "summary": ("", "_count", "_sum", "_created")}
    names = set()
    for family in ServerMetrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
    return frozenset(names)
