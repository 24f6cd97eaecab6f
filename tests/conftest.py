"""Shared fixtures: a synthetic dataset and one tiny build (catalog + target) per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from synthetic import NAME, write_synthetic  # noqa: E402


@pytest.fixture(scope="session")
def synth_data_dir(tmp_path_factory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="session")
def tiny_artifacts(synth_data_dir, tmp_path_factory) -> Path:
    """``padrec build`` of the synthetic dataset with the tiny preset (attribute embeddings)."""
    from padrec_vllm.pipeline import build
    from padrec_vllm.presets import get_preset

    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    build(NAME, get_preset("tiny"), out, data_dir=str(synth_data_dir), embedding="attributes")
    return out
