"""What every engine's bench shares: its config, the validated methods and the sampled users."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.bench.methods import parse_method
from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.data.s3rec import leave_one_out, load_dataset
from padrec_vllm.decoding.accounting import RequestResult
from padrec_vllm.errors import UserError
from padrec_vllm.eval.evaluate import EvalUsers, max_new_tokens, sample_test_users
from padrec_vllm.presets import get_preset


@dataclass(frozen=True)
class BenchConfig:
    artifacts: Path
    methods: tuple[str, ...]
    users: int
    batch_size: int
    num_draft_tokens: int | None = None  # K; default: the preset's
    device: str = "cpu"
    engine: str = "reference"
    data_dir: str | None = None
    seed: int = 0


@dataclass(frozen=True)
class BenchSetup:
    """The artifacts, the sampled test users, K and the token budget of one bench run."""

    paths: ArtifactPaths
    info: dict
    catalog: Catalog
    users: EvalUsers
    num_draft_tokens: int
    limit: int  # max_new_tokens

    @property
    def prompts(self) -> list[list[int]]:
        return [list(p) for p in self.users.prompts]


@dataclass(frozen=True)
class MethodRun:
    """One method's outputs over all users, its summed wall time and per-request latencies."""

    results: list[RequestResult]
    wall_s: float
    latency_ms: list[float]


def bench_users(split, catalog: Catalog, history: int, n: int, seed: int = 0) -> EvalUsers:
    """The test users ``padrec bench`` decodes: ``n`` drawn with ``seed + 1`` (the build's
    evaluation draws with ``seed``)."""
    return sample_test_users(split, catalog, history, n, seed + 1)


def bench_setup(cfg: BenchConfig, builtin: tuple[str, ...] = ("ar",)) -> BenchSetup:
    """Validate ``cfg.methods`` (``ar`` required; every name outside ``builtin`` needs a head
    under ``heads/``) before loading anything heavy, then sample the users."""
    paths = ArtifactPaths(cfg.artifacts)
    info = paths.read_build_info()
    if "ar" not in cfg.methods:
        raise UserError("--methods must include ar (the baseline for speedup and identical_rate)")
    for name in cfg.methods:
        spec = parse_method(name)
        base = spec.head
        if not spec.plain and cfg.engine != "reference":
            raise UserError(f"method {name!r}: HEAD@P, HEAD:tN and HEAD+int8 (gated, tree and "
                            "int8 drafting) need --engine reference")
        if not spec.plain and base in builtin:
            raise UserError(f"method {name!r}: @P, :tN and +int8 apply to a draft head, "
                            f"not to {base}")
        if spec.int8 and cfg.device != "cpu":
            raise UserError(f"method {name!r}: int8 drafting runs on CPU only (--device cpu)")
        if base not in builtin and not paths.has_head(base):
            raise UserError(f"unknown method {name!r}: no head at {paths.head(base)} "
                            "(train it with `padrec build`)")
    preset = get_preset(info["preset"])
    catalog = Catalog.load(paths.root)
    split = leave_one_out(load_dataset(info["dataset"], cfg.data_dir).sequences)
    users = bench_users(split, catalog, preset.history, cfg.users, cfg.seed)
    return BenchSetup(paths, info, catalog, users,
                      cfg.num_draft_tokens or preset.num_draft_tokens,
                      max_new_tokens(catalog, preset.list_len))
