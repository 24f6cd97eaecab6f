"""``padrec bench``: plain decoding and speculative methods side by side, in one process.

Methods are run round-robin batch by batch (``ar`` first in odd rounds, last in even ones), so
machine noise hits every method alike; a warm-up batch per method is excluded. ``speedup`` and
``identical_rate`` are against ``ar`` in the same run. Output JSON (contract of issue 3)::

    {"dataset", "engine", "device", "users", "k", "batch_size",
     "quality": {"recall_at_10", "ndcg_at_10", "invalid_item_rate", "duplicate_rate"},
     "methods": {"<name>": {"wall_s", "tokens_per_s", "latency_ms": {"p50", "p95"}, "tau",
                            "accept_by_pos": [...], "accept_by_slot": {...}, "speedup",
                            "identical_rate", "head_forward_ms", "target_forwards",
                            "draft_forwards", "time_split_s": {"prefill", "draft", "verify"}}}}

``latency_ms`` is per request: the wall time of the batch it was decoded in. ``accept_by_slot``
is keyed by slot name (``L0``.. for SID levels, ``sep``, ``special``).

A method ``HEAD@P`` (reference engine) runs head HEAD with confidence-gated drafting: a round's
chain ends at the first draft to which the head gives probability below P (``decoding.generate``'s
``min_draft_confidence``), so ``eagle,eagle@0.4`` compares fixed-K and gated drafting side by
side. Its ``accept_by_pos`` counts proposed drafts only, its ``head_forward_ms`` is HEAD's.
A method ``HEAD:tN`` (or ``HEAD:tNkM``, ``HEAD:tNkMpQ``; reference engine) runs HEAD with tree
drafting: up to N draft nodes a round, the top M (default 4) children scored per expanded node,
K deep, nodes past the K best kept only when the head gives their path probability >= Q
(``decoding.tree``). Its ``accept_by_pos`` is the rate at which the kept path reaches each
depth; ``draft_forwards`` counts head calls, each over up to M nodes.
``HEAD+int8`` (also ``HEAD+int8@P``, ``HEAD+int8:tN..``; reference engine, CPU) drafts with an
int8 copy of HEAD (``model.int8_linear``); its ``head_forward_ms`` is the int8 copy's.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.tokens import EOS_ID, TokenLayout
from padrec_vllm.data.s3rec import leave_one_out, load_dataset
from padrec_vllm.decoding import RequestResult, TreeSpec, aggregate, generate, identical_output_rate
from padrec_vllm.errors import UserError
from padrec_vllm.eval.evaluate import EvalUsers, list_quality, max_new_tokens, sample_test_users
from padrec_vllm.model.head_checkpoint import load_head
from padrec_vllm.model.heads import DraftHead
from padrec_vllm.model.int8_linear import quantize_head
from padrec_vllm.model.target import load_target
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
class MethodSpec:
    """A bench method: the head it drafts with and how (``parse_method``)."""

    head: str
    min_confidence: float = 0.0
    tree: TreeSpec | None = None
    int8: bool = False  # draft with an int8 copy of the head (model.int8_linear)

    @property
    def plain(self) -> bool:
        """Float chain drafting with K drafts a round (what the vLLM engine runs)."""
        return self.min_confidence == 0.0 and self.tree is None and not self.int8


_TREE = re.compile(r"t(\d+)(?:k(\d+))?(?:p(0?\.\d+|0))?")


def parse_method(name: str) -> MethodSpec:
    """``HEAD`` -> chain drafting; ``HEAD@P`` -> confidence-gated chain, P in [0, 1);
    ``HEAD:tN[kM][pQ]`` -> tree drafting: at most N nodes a round, top M children per node
    (default 4), nodes past the K best kept when their path probability is >= Q (default 0).
    ``HEAD+int8`` in any of these drafts with the head's int8 copy.
    Raises UserError naming the method when it does not parse."""
    spec = _parse_drafting(name)
    head, plus, precision = spec.head.partition("+")
    if not plus:
        return spec
    if not head or precision != "int8":
        raise UserError(f"method {name!r}: HEAD+int8 is the only precision suffix (for a head name)")
    return MethodSpec(head, spec.min_confidence, spec.tree, int8=True)


def _parse_drafting(name: str) -> MethodSpec:
    """``parse_method`` without the precision suffix (left on the head name)."""
    if ":" in name:
        base, _, tree = name.partition(":")
        m = _TREE.fullmatch(tree)
        nodes, top_k, q = (int(m[1]), int(m[2] or 4), float(m[3] or 0)) if m else (0, 0, 0.0)
        if not base or nodes < 1 or top_k < 1:
            raise UserError(f"method {name!r}: HEAD:tN[kM][pQ] needs a head name, N >= 1 tree nodes, "
                            "M >= 1 children per node and a path probability 0 <= Q < 1")
        return MethodSpec(base, tree=TreeSpec(nodes, top_k, q))
    base, at, conf = name.partition("@")
    if not at:
        return MethodSpec(name)
    try:
        p = float(conf)
    except ValueError:
        p = -1.0
    if not base or not 0.0 <= p < 1.0:
        raise UserError(f"method {name!r}: HEAD@P needs a head name and a confidence P in [0, 1)")
    return MethodSpec(base, min_confidence=p)


def slot_names(layout: TokenLayout) -> dict[int, str]:
    names = {lvl: f"L{lvl}" for lvl in range(layout.num_levels)}
    return names | {layout.sep_slot: "sep", layout.special_slot: "special"}


def time_head_forwards(heads: dict[str, DraftHead], target, batch_size: int, repeats: int = 300) -> dict[str, float]:
    """Milliseconds per draft forward of one token per row (cache of 64 positions) for each head:
    median of ``repeats`` calls, the heads interleaved call by call so machine noise hits all
    alike; 20 warm-up calls each are excluded."""
    if not heads:
        return {}
    first = next(iter(heads.values()))
    device = next(first.parameters()).device
    ids = torch.full((batch_size, 1), 5, dtype=torch.long, device=device)  # [B, 1]
    feats = torch.randn(batch_size, 1, first.config.hidden_size, device=device)  # [B, 1, H]
    pos = torch.full((batch_size, 1), 10, dtype=torch.long, device=device)  # [B, 1]
    embed = target.get_input_embeddings()
    caches = {n: h.new_cache(batch_size, 64) for n, h in heads.items()}
    times: dict[str, list[float]] = {n: [] for n in heads}
    with torch.inference_mode():
        for i in range(repeats + 20):
            for name, head in heads.items():
                t0 = time.perf_counter()
                head(ids, feats, pos, step=2, embed=embed, cache=caches[name])
                if device.type == "cuda":
                    torch.cuda.synchronize()
                if i >= 20:
                    times[name].append(time.perf_counter() - t0)
    return {n: 1000 * statistics.median(t) for n, t in times.items()}


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else 0.0


@dataclass(frozen=True)
class BenchSetup:
    """What every engine's bench needs: the artifacts, the sampled test users, K, the limit."""

    paths: ArtifactPaths
    info: dict
    catalog: Catalog
    users: EvalUsers
    k: int
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
            raise UserError(f"method {name!r}: HEAD@P, HEAD:tN and HEAD+int8 (gated, tree and int8 drafting) "
                            "need --engine reference")
        if not spec.plain and base in builtin:
            raise UserError(f"method {name!r}: @P, :tN and +int8 apply to a draft head, not to {base}")
        if spec.int8 and cfg.device != "cpu":
            raise UserError(f"method {name!r}: int8 drafting runs on CPU only (--device cpu)")
        if base not in builtin and not (paths.head(base) / "config.json").exists():
            raise UserError(f"unknown method {name!r}: no head at {paths.head(base)} (train it with `padrec build`)")
    preset = get_preset(info["preset"])
    catalog = Catalog.load(paths.root)
    split = leave_one_out(load_dataset(info["dataset"], cfg.data_dir).sequences)
    users = bench_users(split, catalog, preset.history, cfg.users, cfg.seed)
    return BenchSetup(paths, info, catalog, users, cfg.num_draft_tokens or preset.num_draft_tokens,
                      max_new_tokens(catalog, preset.list_len))


def bench_result(cfg: BenchConfig, setup: BenchSetup, runs: dict[str, MethodRun],
                 head_forward_ms: dict[str, float | None], engine: str) -> dict:
    """The bench JSON (module docstring) from every method's run; ``runs`` must hold ``ar``."""
    quality = list_quality(setup.catalog, [r.tokens for r in runs["ar"].results], setup.users.targets).as_dict()
    snames = slot_names(setup.catalog.layout)
    methods = {}
    for name, run in runs.items():
        agg = aggregate(run.results)
        methods[name] = {
            "wall_s": run.wall_s,
            "tokens_per_s": agg.num_tokens / run.wall_s,
            "latency_ms": {"p50": statistics.median(run.latency_ms), "p95": _percentile(run.latency_ms, 0.95)},
            "tau": agg.tau,
            "accept_by_pos": agg.accept_rate_by_pos,
            "accept_by_slot": {snames[s]: r for s, r in agg.accept_rate_by_slot.items()},
            "speedup": runs["ar"].wall_s / run.wall_s,
            "identical_rate": identical_output_rate(run.results, runs["ar"].results),
            "head_forward_ms": head_forward_ms.get(name),
            "target_forwards": agg.target_forwards,
            "draft_forwards": agg.draft_forwards,
            "time_split_s": {"prefill": agg.prefill_s, "draft": agg.draft_s, "verify": agg.verify_s},
        }
    return {
        "dataset": setup.info["dataset"], "preset": setup.info["preset"], "engine": engine,
        "device": _device_name(cfg.device), "users": len(setup.users.users), "k": setup.k,
        "batch_size": cfg.batch_size,
        "quality": {key: quality[key] for key in ("recall_at_10", "ndcg_at_10", "invalid_item_rate", "duplicate_rate")},
        "methods": methods,
    }


def run_bench(cfg: BenchConfig) -> dict:
    if cfg.engine == "vllm":
        from padrec_vllm.vllm_plugin.bench import run_vllm_bench

        return run_vllm_bench(cfg)
    if cfg.engine != "reference":
        raise UserError(f"unknown engine {cfg.engine!r}")
    setup = bench_setup(cfg)
    target = load_target(setup.paths.target, device=cfg.device)
    specs = {name: parse_method(name) for name in cfg.methods}
    loaded: dict[str, DraftHead] = {}  # "HEAD" or "HEAD+int8" -> the head
    heads: dict[str, DraftHead | None] = {"ar": None}  # method name -> its head
    for name, spec in specs.items():
        if name != "ar":
            if spec.head not in loaded:
                loaded[spec.head] = load_head(setup.paths.head(spec.head), device=cfg.device, dtype=torch.float32).eval()
            key = _head_key(spec)
            if key not in loaded:
                loaded[key] = quantize_head(loaded[spec.head], target)
            heads[name] = loaded[key]
    prompts = setup.prompts

    def run(name: str, chunk: list[list[int]]) -> tuple[list[RequestResult], float]:
        t0 = time.perf_counter()
        res = generate(target, chunk, max_new_tokens=setup.limit, eos_id=EOS_ID, batch_size=len(chunk),
                       head=heads[name], num_draft_tokens=setup.k if heads[name] is not None else None,
                       min_draft_confidence=specs[name].min_confidence, tree=specs[name].tree)
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        return res, time.perf_counter() - t0

    used = {_head_key(s) for n, s in specs.items() if n != "ar"}
    names = list(heads)
    for name in names:  # warm-up, excluded
        run(name, prompts[: cfg.batch_size])
    results: dict[str, list[RequestResult]] = {n: [] for n in names}
    wall = {n: 0.0 for n in names}
    latency: dict[str, list[float]] = {n: [] for n in names}
    starts = range(0, len(prompts), cfg.batch_size)
    for i, start in enumerate(tqdm(starts, desc=f"bench {','.join(names)}", unit="batch")):
        chunk = prompts[start : start + cfg.batch_size]
        for name in names if i % 2 == 0 else names[::-1]:
            res, secs = run(name, chunk)
            results[name] += res
            wall[name] += secs
            latency[name] += [1000 * secs] * len(chunk)
    runs = {n: MethodRun(results[n], wall[n], latency[n]) for n in names}
    timed = time_head_forwards({k: h for k, h in loaded.items() if k in used}, target, cfg.batch_size)
    head_ms = {n: timed[_head_key(specs[n])] for n in heads if n != "ar"}
    return bench_result(cfg, setup, runs, head_ms, engine="reference")


def _head_key(spec: MethodSpec) -> str:
    return spec.head + ("+int8" if spec.int8 else "")


def _device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def format_table(result: dict) -> list[str]:
    head = f"{'method':16s} {'tau':>5s} {'speedup':>7s} {'tok/s':>8s} {'p50 ms':>8s} {'p95 ms':>8s} {'ident':>6s}  accept by position"
    rows = [(f"{result['dataset']} ({result.get('preset', '?')}), engine {result['engine']}, {result['device']}, "
             f"{result['users']} users, batch {result['batch_size']}, K={result['k']}"), head]
    for name, m in result["methods"].items():
        acc = " ".join(f"{a:.2f}" for a in m["accept_by_pos"])
        rows.append(f"{name:16s} {m['tau']:5.2f} {m['speedup']:7.2f} {m['tokens_per_s']:8.0f} "
                    f"{m['latency_ms']['p50']:8.1f} {m['latency_ms']['p95']:8.1f} {m['identical_rate']:6.3f}  {acc}")
    q = result["quality"]
    rows.append(f"quality (ar lists): Recall@10 {q['recall_at_10']:.4f}  NDCG@10 {q['ndcg_at_10']:.4f}  "
                f"invalid {q['invalid_item_rate']:.4f}  duplicates {q['duplicate_rate']:.4f}")
    return rows


def plot_acceptance(result: dict, path: Path) -> None:
    """Two panels: acceptance rate by draft position and by item slot, one bar group per head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [n for n, m in result["methods"].items() if m["accept_by_pos"]]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / max(1, len(heads))
    for i, name in enumerate(heads):
        m = result["methods"][name]
        pos = range(1, len(m["accept_by_pos"]) + 1)
        ax1.bar([p + (i - (len(heads) - 1) / 2) * width for p in pos], m["accept_by_pos"], width, label=f"{name} (tau {m['tau']:.2f})")
        slots = list(m["accept_by_slot"])
        ax2.bar([j + (i - (len(heads) - 1) / 2) * width for j in range(len(slots))],
                [m["accept_by_slot"][s] for s in slots], width, label=name)
        ax2.set_xticks(range(len(slots)), slots)
    ax1.set_xticks(range(1, result["k"] + 1))
    ax1.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1), title="by draft position")
    ax2.set(xlabel="item slot of the drafted token", ylim=(0, 1), title="by item slot (given the chain reached it)")
    ax1.legend()
    fig.suptitle(f"{result['dataset']} ({result.get('preset', '?')}), {result['engine']} engine, batch {result['batch_size']}, K={result['k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_outputs(result: dict, json_path: Path | None, plot_path: Path | None) -> None:
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2) + "\n")
    if plot_path:
        plot_path.parent.mkdir(parents=True, exist_ok=True)
        plot_acceptance(result, plot_path)
