"""The bench JSON, its table and its plot, from every method's run.

JSON (the same for both engines)::

    {"dataset", "preset", "engine", "device", "users", "num_draft_tokens", "batch_size",
     "constrained", "exclude_history", "forced_share_by_slot": {...},
     "quality": {"recall_at_10", "ndcg_at_10", "invalid_item_rate", "duplicate_rate"},
     "methods": {"<name>": {"wall_s", "tokens_per_s", "latency_ms": {"p50", "p95"}, "tau",
                            "accept_by_pos": [...], "accept_by_slot": {...}, "speedup",
                            "identical_rate", "head_forward_ms", "target_forwards",
                            "plain_forwards", "draft_forwards", "forced_tokens",
                            "forced_share", "forwards_saved",
                            "time_split_s": {"prefill", "draft", "verify"}}}}

Figures as defined in ``padrec_vllm.decoding.accounting``. ``speedup`` and ``identical_rate`` are
against ``ar`` in the same run; ``latency_ms`` is per request: the wall time of the batch it was
decoded in; ``accept_by_slot`` is keyed by slot label (``TokenLayout.slot_labels``).

``constrained``: every method decoded under the catalog constraint (``ar`` is then plain
constrained greedy); ``exclude_history``: the users' history items were excluded too.
``forced_tokens``: the method's skipped forced tokens, summed over users (counted in tau as
emitted tokens); ``forced_share = forced_tokens / decode tokens`` (decode tokens: every emitted
token but the first, the prefill's), 0 when the method skips none (``ar``, unconstrained runs);
``forwards_saved``: target forwards that plain (constrained, when constrained) greedy spends
beyond this method's over the same users, ``ar``'s ``target_forwards`` minus this method's (0
for ``ar``; for ``forced`` it equals ``forced_tokens``). ``forced_share_by_slot``: per slot
label, the share of the ``ar`` lists' tokens of that slot (the prefill's first token included)
that were the only legal token when emitted; empty when unconstrained.
"""

from __future__ import annotations

import json
import platform
import statistics
from pathlib import Path

from padrec_vllm.bench.setup import BenchConfig, BenchSetup, MethodRun
from padrec_vllm.decoding.accounting import RequestResult, aggregate, identical_output_rate
from padrec_vllm.eval.evaluate import list_quality

QUALITY_KEYS = ("recall_at_10", "ndcg_at_10", "invalid_item_rate", "duplicate_rate")


def _percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))] if s else 0.0


def device_name(device: str) -> str:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def forced_share_by_slot(setup: BenchSetup, results: list[RequestResult]) -> dict[str, float]:
    """Per slot label, the share of ``results``' tokens that were forced (module docstring),
    replayed through fresh constraints; {} when the setup is unconstrained."""
    states = setup.constraints()
    if states is None:
        return {}
    rule, labels = setup.catalog.layout.slot_rule(), setup.catalog.layout.slot_labels()
    counts: dict[int, list[int]] = {}  # slot -> [forced, tokens]
    for state, res in zip(states, results):
        for j, tok in enumerate(res.tokens):
            c = counts.setdefault(rule.completion_slot(j, tok), [0, 0])
            c[0] += state.forced() == tok
            c[1] += 1
            state.accept(tok)
    return {labels[s]: f / n for s, (f, n) in sorted(counts.items())}


def bench_result(cfg: BenchConfig, setup: BenchSetup, runs: dict[str, MethodRun],
                 head_forward_ms: dict[str, float | None], engine: str) -> dict:
    """The bench JSON (module docstring); ``runs`` must hold ``ar``."""
    ar = runs["ar"]
    quality = list_quality(setup.catalog, [r.tokens for r in ar.results], setup.users.targets)
    labels = setup.catalog.layout.slot_labels()
    ar_forwards = aggregate(ar.results).target_forwards
    methods = {}
    for name, run in runs.items():
        agg = aggregate(run.results)
        decode_tokens = sum(r.decode_tokens for r in run.results)
        methods[name] = {
            "wall_s": run.wall_s,
            "tokens_per_s": agg.num_tokens / run.wall_s,
            "latency_ms": {"p50": statistics.median(run.latency_ms),
                           "p95": _percentile(run.latency_ms, 0.95)},
            "tau": agg.tau,
            "accept_by_pos": agg.accept_rate_by_pos,
            "accept_by_slot": {labels[s]: r for s, r in agg.accept_rate_by_slot.items()},
            "speedup": ar.wall_s / run.wall_s,
            "identical_rate": identical_output_rate(run.results, ar.results),
            "head_forward_ms": head_forward_ms.get(name),
            "target_forwards": agg.target_forwards,
            "plain_forwards": agg.plain_forwards,
            "draft_forwards": agg.draft_forwards,
            "forced_tokens": agg.forced_tokens,
            "forced_share": agg.forced_tokens / decode_tokens if decode_tokens else 0.0,
            "forwards_saved": ar_forwards - agg.target_forwards,
            "time_split_s": {"prefill": agg.prefill_s, "draft": agg.draft_s,
                             "verify": agg.verify_s},
        }
    q = quality.as_dict()
    return {
        "dataset": setup.info["dataset"], "preset": setup.info["preset"], "engine": engine,
        "device": device_name(cfg.device), "users": len(setup.users.users),
        "num_draft_tokens": setup.num_draft_tokens, "batch_size": cfg.batch_size,
        "constrained": cfg.constrained, "exclude_history": cfg.exclude_history,
        "forced_share_by_slot": forced_share_by_slot(setup, ar.results),
        "quality": {key: q[key] for key in QUALITY_KEYS},
        "methods": methods,
    }


def _constraint_label(result: dict) -> str:
    if not result.get("constrained", False):  # JSON from before the constraint: unconstrained
        return "unconstrained"
    return "constrained" + (", history excluded" if result.get("exclude_history") else "")


def format_table(result: dict) -> list[str]:
    """The bench JSON as printed lines: one row per method, then the quality of ``ar``'s lists."""
    rows = [
        f"{result['dataset']} ({result.get('preset', '?')}), engine {result['engine']}, "
        f"{result['device']}, {result['users']} users, batch {result['batch_size']}, "
        f"K={result['num_draft_tokens']}, {_constraint_label(result)}",
        f"{'method':16s} {'tau':>5s} {'speedup':>7s} {'tok/s':>8s} {'p50 ms':>8s} "
        f"{'p95 ms':>8s} {'ident':>6s} {'forced':>6s}  accept by position",
    ]
    for name, m in result["methods"].items():
        acc = " ".join(f"{a:.2f}" for a in m["accept_by_pos"])
        rows.append(f"{name:16s} {m['tau']:5.2f} {m['speedup']:7.2f} {m['tokens_per_s']:8.0f} "
                    f"{m['latency_ms']['p50']:8.1f} {m['latency_ms']['p95']:8.1f} "
                    f"{m['identical_rate']:6.3f} {m.get('forced_share', 0.0):6.3f}  {acc}")
    q = result["quality"]
    rows.append(f"quality (ar lists): Recall@10 {q['recall_at_10']:.4f}  "
                f"NDCG@10 {q['ndcg_at_10']:.4f}  invalid {q['invalid_item_rate']:.4f}  "
                f"duplicates {q['duplicate_rate']:.4f}")
    return rows


def plot_acceptance(result: dict, path: Path) -> None:
    """Two panels: acceptance rate by draft position and by item slot, one bar group per head;
    when constrained, the by-slot panel also shows (hatched, grey) the share of each slot's
    tokens that were forced, and the title each method's forced share."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = [n for n, m in result["methods"].items() if m["accept_by_pos"]]
    forced = result.get("forced_share_by_slot") or {}
    slots = {s for n in heads for s in result["methods"][n]["accept_by_slot"]} | set(forced)
    slots = sorted(slots, key=lambda s: (s[0] != "L", int(s[1:]) if s[0] == "L" else 0, s))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    groups = len(heads) + bool(forced)
    width = 0.8 / max(1, groups)
    for i, name in enumerate(heads):
        m = result["methods"][name]
        shift = (i - (groups - 1) / 2) * width
        pos = range(1, len(m["accept_by_pos"]) + 1)
        ax1.bar([p + shift for p in pos], m["accept_by_pos"], width,
                label=f"{name} (tau {m['tau']:.2f})")
        ax2.bar([j + shift for j in range(len(slots))],
                [m["accept_by_slot"].get(s, 0.0) for s in slots], width, label=name)
    if forced:
        shift = (groups - 1) / 2 * width
        ax2.bar([j + shift for j in range(len(slots))], [forced.get(s, 0.0) for s in slots],
                width, color="lightgrey", hatch="//", edgecolor="grey",
                label="forced (share of tokens)")
        ax2.legend(fontsize=8)
    ax2.set_xticks(range(len(slots)), slots)
    k = result["num_draft_tokens"]
    ax1.set_xticks(range(1, k + 1))
    ax1.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1),
            title="by draft position")
    ax2.set(xlabel="item slot of the drafted token", ylim=(0, 1),
            title="by item slot (given the chain reached it)")
    ax1.legend()
    shares = ", ".join(f"{n} {m['forced_share']:.2f}" for n, m in result["methods"].items()
                       if m.get("forced_share"))
    fig.suptitle(f"{result['dataset']} ({result.get('preset', '?')}), {result['engine']} engine, "
                 f"batch {result['batch_size']}, K={k}, {_constraint_label(result)}"
                 + (f"; forced share of tokens: {shares}" if shares else ""))
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
