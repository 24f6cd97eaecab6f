"""Shared fixtures: a synthetic dataset and one tiny build (catalog + target) per test session,
and one more in the shared token format.

``tests/`` (helper modules) and the repository root (``benchmarks``, the dev-only helpers that
are not installed) are put on ``sys.path``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from synthetic import NAME, write_synthetic  # noqa: E402


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of tiny-matmul tests: OpenMP threads only spin against
    whatever else runs on the machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def target():
    """A random tiny Llama target (tests/tiny_models.py)."""
    from tiny_models import tiny_target

    return tiny_target()


@pytest.fixture(scope="module")
def prompts():
    """Four prompts of mixed lengths (5, 9, 3, 12 tokens): one batch of 4 with padding."""
    from tiny_models import random_prompts

    return random_prompts([5, 9, 3, 12], seed=3)


@pytest.fixture(scope="module")
def reference(target, prompts):
    """``target``'s plain greedy completions of ``prompts``: no eos, 24 tokens."""
    from padrec_vllm.decoding import generate

    results = generate(target, prompts, max_new_tokens=24, eos_id=None, batch_size=4)
    return [r.tokens for r in results]


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


@pytest.fixture(scope="session")
def tiny_shared_artifacts(synth_data_dir, tmp_path_factory) -> Path:
    """``tiny_artifacts`` in the shared token format (``padrec build --token-format shared``)."""
    from padrec_vllm.pipeline import build
    from padrec_vllm.presets import get_preset

    out = tmp_path_factory.mktemp("artifacts") / "tiny-shared"
    build(NAME, get_preset("tiny"), out, data_dir=str(synth_data_dir), embedding="attributes",
          token_format="shared")
    return out


@pytest.fixture(scope="module")
def settings(tiny_artifacts, synth_data_dir, tmp_path_factory):
    """Server settings over the tiny build: reference engine, the schedule ``1:3,2-:0`` (fixed,
    so that tests know when requests speculate; auto's choice is tested apart), calibrated
    against K = 0 with 8 requests per point at batch sizes 1, 2 and 4, at most 8 in flight and 4
    requests per batch."""
    from server.settings import Settings

    return Settings(
        artifacts=tiny_artifacts,
        engine="reference",
        data_dir=synth_data_dir,
        spec_schedule="1:3,2-:0",
        calibration_requests=8,
        calibration_max_batch=4,
        calibration_dir=tmp_path_factory.mktemp("calibration"),
        max_in_flight=8,
        max_batch_requests=4,
    )
