"""What every engine's bench shares: its config, the validated methods and the sampled users.

Constrained by default (``BenchConfig.constrained``): every method decodes under the catalog
constraint, one ``CatalogTrie`` per run and a fresh ``ListConstraint`` per request per method
(``BenchSetup.constraints``; the vLLM bench sends ``BenchSetup.specs`` through vLLM's
structured-output path). Gated drafting (``HEAD@P``) does not run so; tree drafting
(``HEAD:tN``) does, on the reference engine. ``constrained=False`` is the free decoding of before.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.artifacts_check import check_artifacts
from padrec_vllm.bench.methods import parse_method
from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.constraint import CatalogTrie, ListConstraint, ListSpec
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
    constrained: bool = True  # decode under the catalog constraint (module docstring)
    exclude_history: bool = False  # constrained: also exclude each user's history items


@dataclass(frozen=True)
class BenchSetup:
    """The artifacts, the sampled test users, K and the token budget of one bench run."""

    paths: ArtifactPaths
    info: dict
    catalog: Catalog
    users: EvalUsers
    num_draft_tokens: int
    limit: int  # max_new_tokens
    list_len: int = 10  # k: items per list
    trie: CatalogTrie | None = None  # the catalog's trie when constrained, else None
    exclude_history: bool = False

    @property
    def prompts(self) -> list[list[int]]:
        return [list(p) for p in self.users.prompts]

    def specs(self, start: int = 0, stop: int | None = None) -> list[ListSpec] | None:
        """What the lists of users ``start:stop`` must respect, or None unconstrained."""
        if self.trie is None:
            return None
        hist = self.users.histories[start:stop] if self.exclude_history else ()
        n = len(self.users.users[start:stop])
        return [ListSpec(self.list_len, tuple(hist[i]) if hist else ()) for i in range(n)]

    def constraints(self, start: int = 0, stop: int | None = None) -> list[ListConstraint] | None:
        """Fresh constraints of users ``start:stop`` (one per request), or None unconstrained."""
        specs = self.specs(start, stop)
        return None if specs is None else [s.start(self.trie) for s in specs]


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


def _check_constraint(cfg: BenchConfig, name: str, spec) -> None:
    """UserError for a method the constraint setting does not allow (module docstring)."""
    if name == "forced" and cfg.engine != "reference":
        raise UserError("method 'forced' (plain decoding that skips forced tokens) runs on the "
                        f"reference engine only; the {cfg.engine} engine verifies forced tokens")
    if not cfg.constrained:
        if name == "forced":
            raise UserError("method 'forced' (plain decoding that skips forced tokens) needs the "
                            "constraint; drop --unconstrained")
        return
    if spec.min_confidence > 0:
        raise UserError(f"method {name!r}: gated (HEAD@P) drafting does not run under the "
                        "catalog constraint yet; add --unconstrained")


def bench_setup(cfg: BenchConfig, builtin: tuple[str, ...] = ("ar", "forced")) -> BenchSetup:
    """Validate ``cfg.methods`` (``ar`` required; every name outside ``builtin`` needs a head
    under ``heads/``; the constraint setting, ``_check_constraint``) and check the artifacts
    with those heads (``artifacts_check``) before loading anything heavy, then sample the users
    and, when constrained, build the catalog's trie."""
    paths = ArtifactPaths(cfg.artifacts)
    if cfg.exclude_history and not cfg.constrained:
        raise UserError("--exclude-history needs the constraint; drop --unconstrained")
    info = paths.read_build_info()
    if "ar" not in cfg.methods:
        raise UserError("--methods must include ar (the baseline for speedup and identical_rate)")
    for name in cfg.methods:
        spec = parse_method(name)
        _check_constraint(cfg, name, spec)
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
    heads = [parse_method(name).head for name in cfg.methods]
    check_artifacts(paths.root, heads=[h for h in heads if h not in builtin])
    preset = get_preset(info["preset"])
    catalog = Catalog.load(paths.root)
    split = leave_one_out(load_dataset(info["dataset"], cfg.data_dir).sequences)
    users = bench_users(split, catalog, preset.history, cfg.users, cfg.seed)
    return BenchSetup(paths, info, catalog, users,
                      cfg.num_draft_tokens or preset.num_draft_tokens,
                      max_new_tokens(catalog, preset.list_len), preset.list_len,
                      CatalogTrie.from_catalog(catalog) if cfg.constrained else None,
                      cfg.exclude_history)
