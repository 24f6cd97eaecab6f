"""Seed study of the draft heads: every variant trained with several seeds, tau on test users.

One recipe for every head (the preset's steps, batch and data, as in `padrec build`); only the seed
changes, and under one seed every variant starts from the same body weights. Each (variant, seed)
head is trained on the same self-distillation set and decoded with the reference engine (float32,
chain speculative decoding, K from the preset) on the bench's test users; tau, acceptance by draft
position and by item slot, and the identical rate against plain greedy decoding are recorded.
The JSON is rewritten after every head, so a run cut short keeps what it finished.

    python scripts/head_seed_study.py --artifacts artifacts/bench-Beauty --variants eagle,padrec \
        --seeds 0,1,2 --users 2000 --device cuda --json runs/study-eagle-padrec.json
    python scripts/head_seed_study.py --merge runs/study-*.json --json docs/results/X.json \
        --plot X.png
    python scripts/head_seed_study.py --compare per-level.json shared.json --json OUT.json \
        --plot OUT.png   # merged studies of one dataset on two token formats, side by side
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.bench import BenchConfig, bench_setup, format_table, run_reference_bench
from padrec_vllm.catalog.tokens import EOS_ID
from padrec_vllm.data.s3rec import leave_one_out, load_dataset
from padrec_vllm.decoding import aggregate, generate, identical_output_rate
from padrec_vllm.model.config import HEAD_VARIANTS
from padrec_vllm.model.decoding_head import decoding_head
from padrec_vllm.model.head_checkpoint import load_head
from padrec_vllm.model.target import load_target
from padrec_vllm.presets import get_preset
from padrec_vllm.train.heads import build_distill_set, distill_prompts, train_head, variant_config


def run_study(args) -> None:
    paths = ArtifactPaths(Path(args.artifacts))
    info = paths.read_build_info()
    preset = get_preset(info["preset"])
    if args.steps or args.head_users:  # smoke runs
        preset = replace(
            preset,
            head_steps=args.steps or preset.head_steps,
            head_users=args.head_users or preset.head_users,
        )
    # the bench's users, token budget and (unless --unconstrained) catalog constraint
    setup = bench_setup(BenchConfig(paths.root, ("ar",), args.users, 1, device=args.device,
                                    data_dir=args.data_dir, constrained=not args.unconstrained))
    catalog = setup.catalog
    split = leave_one_out(load_dataset(info["dataset"], args.data_dir).sequences)
    target = load_target(paths.target, device=args.device)
    limit = setup.limit
    prompts = setup.prompts
    batch = 256 if args.device.startswith("cuda") else 16
    plain = generate(
        target, prompts, max_new_tokens=limit, eos_id=EOS_ID, batch_size=batch,
        constraints=setup.constraints(), progress="plain",
    )
    t0 = time.perf_counter()
    data = build_distill_set(
        target,
        distill_prompts(split.train, catalog, preset.history, preset.head_users, preset.seed),
        limit,
        args.device,
        batch,
    )
    out = {
        "dataset": info["dataset"],
        "preset": preset.name,
        "token_format": catalog.layout.token_format,
        "constrained": setup.trie is not None,
        "users": len(prompts),
        "k": preset.num_draft_tokens,
        "head_steps": preset.head_steps,
        "head_batch_size": preset.head_batch_size,
        "distill_sequences": len(data.tokens),
        "distill_s": time.perf_counter() - t0,
        "runs": [],
    }
    names = catalog.layout.slot_labels()
    heads: dict[str, Path] = {}
    for seed in args.seeds:
        for variant in args.variants:
            unroll = args.train_unroll or preset.num_draft_tokens
            cfg = variant_config(variant, unroll, preset.head_steps, preset.head_batch_size, seed)
            if args.step_decay is not None:
                cfg = replace(cfg, step_decay=args.step_decay)
            if args.topk_distill is not None:
                cfg = replace(cfg, topk_distill=args.topk_distill)
            tag = (
                (f"-k{unroll}" if args.train_unroll else "")
                + (f"-d{cfg.step_decay:g}" if args.step_decay is not None else "")
                + (f"-t{args.topk_distill}" if args.topk_distill is not None else "")
            )
            head_dir = Path(args.heads_out) / f"{variant}{tag}-s{seed}"
            rep = train_head(target, catalog, data, cfg, head_dir, args.device)
            heads[head_dir.name] = head_dir
            head = load_head(head_dir, device=args.device, dtype=torch.float32).eval()
            res = generate(
                target,
                prompts,
                max_new_tokens=limit,
                eos_id=EOS_ID,
                batch_size=batch,
                head=decoding_head(head, target),
                num_draft_tokens=preset.num_draft_tokens,
                constraints=setup.constraints(),
                progress=f"decode {variant} s{seed}",
            )
            agg = aggregate(res)
            out["runs"].append(
                {
                    "variant": variant + tag,
                    "tag": tag,
                    "seed": seed,
                    "head": head_dir.name,
                    "train_unroll": unroll,
                    "step_decay": cfg.step_decay,
                    "topk_distill": cfg.topk_distill,
                    "train_s": rep.seconds,
                    "final_loss": rep.final_loss,
                    "final_top1": rep.final_top1,
                    "tau": agg.tau,
                    "accept_by_pos": agg.accept_rate_by_pos,
                    "accept_by_slot": {names[s]: r for s, r in agg.accept_rate_by_slot.items()},
                    "identical_rate": identical_output_rate(res, plain),
                }
            )
            print(
                f"[study] {variant}{tag} seed {seed}: tau {agg.tau:.4f}, identical "
                f"{out['runs'][-1]['identical_rate']:.4f}, trained in {rep.seconds:.0f} s",
                flush=True,
            )
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.bench_users:
        timed = bench_side_by_side(paths, heads, args)
        for r in out["runs"]:
            m = timed["methods"][r["head"]]
            r["speedup"] = m["speedup"]
            r["bench_tau"] = m["tau"]
            r["head_forward_ms"] = m.get("head_forward_ms")
        out["bench"] = {k: v for k, v in timed.items() if k != "methods"} | {
            "ar": timed["methods"]["ar"]}
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


def bench_side_by_side(paths: ArtifactPaths, heads: dict[str, Path], args) -> dict:
    """``padrec bench`` (reference engine, batch 1) of plain decoding and every study head in one
    run, methods interleaved per user: a view of the artifacts (symlinks) whose ``heads/`` holds
    the study's heads, so each head's speedup is measured side by side with the others."""
    view = Path(args.heads_out) / "view"
    if view.exists():
        shutil.rmtree(view)
    (view / "heads").mkdir(parents=True)
    for entry in paths.root.iterdir():
        if entry.name != "heads":
            (view / entry.name).symlink_to(entry.resolve())
    for name, head_dir in heads.items():
        (view / "heads" / name).symlink_to(head_dir.resolve())
    cfg = BenchConfig(view, ("ar", *heads), args.bench_users, 1, device=args.device,
                      data_dir=args.data_dir, constrained=not args.unconstrained)
    result = run_reference_bench(cfg)
    print("\n".join(format_table(result)), flush=True)
    return result


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per variant: tau of every seed, mean, sample std, the paired difference to the eagle head
    of the same recipe (tag) and seed, and the same for the speedup when the study timed its
    heads (``--bench-users``)."""
    by_variant: dict[str, dict[int, dict]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r
    summary = {}
    for variant, rows in by_variant.items():
        tag = next(iter(rows.values())).get("tag", "")
        eagle = by_variant.get("eagle" + tag, {})  # the eagle head of the same recipe
        seeds = sorted(rows)
        row: dict = {"seeds": seeds}
        for key in ("tau", "speedup"):
            if not all(key in rows[s] for s in seeds):
                continue
            vals = [rows[s][key] for s in seeds]
            prefix = "" if key == "tau" else "speedup_"
            row[key] = vals
            row[prefix + "mean"] = statistics.mean(vals)
            row[prefix + "std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
            paired = [rows[s][key] / eagle[s][key] - 1 for s in seeds
                      if s in eagle and key in eagle[s]]
            if not variant.startswith("eagle") and paired:
                row[prefix + "vs_eagle_same_seed"] = paired
                row[prefix + "vs_eagle_mean"] = statistics.mean(paired)
        summary[variant] = row
    return summary


def describe(variant: str, row: dict) -> str:
    """One printed line of a ``summarize`` row: tau per seed, mean +- std, the paired gap to
    eagle, and the same for the speedup when present."""
    taus = ", ".join(f"{t:.3f}" for t in row["tau"])
    line = f"{variant:16s} tau {row['mean']:.4f} +- {row['std']:.4f}  ({taus})"
    if "vs_eagle_mean" in row:
        line += f"  vs eagle (same seed) {100 * row['vs_eagle_mean']:+.2f}%"
    if "speedup_mean" in row:
        line += f"  speedup {row['speedup_mean']:.3f} +- {row['speedup_std']:.3f}"
        if "speedup_vs_eagle_mean" in row:
            line += f" ({100 * row['speedup_vs_eagle_mean']:+.2f}% vs eagle)"
    return line


def merge(args) -> None:
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    out = {k: v for k, v in parts[0].items() if k != "runs"}
    out["runs"] = sorted(
        (r for p in parts for r in p["runs"]), key=lambda r: (r["variant"], r["seed"])
    )
    out["summary"] = summarize(out["runs"])
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    for variant, row in out["summary"].items():
        print(describe(variant, row))
    if args.plot:
        plot(out, Path(args.plot))


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = out["summary"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, (variant, row) in enumerate(summary.items()):
        ax.scatter([i] * len(row["tau"]), row["tau"], color="tab:blue", alpha=0.6, zorder=3)
        ax.errorbar(
            [i],
            [row["mean"]],
            yerr=[row["std"]],
            fmt="_",
            color="black",
            markersize=18,
            capsize=6,
            zorder=4,
        )
    ax.set_xticks(range(len(summary)), list(summary))
    seeds = len(next(iter(summary.values()))["tau"])
    ax.set(
        ylabel="tau (tokens per target forward)",
        title=f"{out['dataset']} ({out['preset']}): draft heads over {seeds} seeds, "
        f"{out['users']} test users, K={out['k']}",
    )
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def compare(args) -> None:
    """Studies of one dataset on several token formats: per format and variant, ``summarize``'s
    row (tau and, when timed, speedup: mean, std over seeds, paired gap to eagle); JSON and a
    grouped plot."""
    parts = [json.loads(Path(p).read_text()) for p in args.compare]
    out = {"dataset": parts[0]["dataset"], "preset": parts[0]["preset"],
           "users": parts[0]["users"], "k": parts[0]["k"], "formats": {}}
    for part in parts:
        fmt = part.get("token_format", "per-level")
        summary = summarize(part["runs"])
        out["formats"][fmt] = {"summary": summary, "runs": part["runs"]}
        for variant, row in summary.items():
            print(f"{fmt:10s} {describe(variant, row)}")
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    if args.plot:
        plot_formats(out, Path(args.plot))


def plot_formats(out: dict, path: Path) -> None:
    """Grouped points: x = head variant, one colour per token format; mean +- std over seeds of
    tau, and of the speedup in a second panel when the studies timed their heads."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    formats = list(out["formats"])
    variants = list(dict.fromkeys(v for f in formats for v in out["formats"][f]["summary"]))
    panels = [("tau", "", "tau (tokens per target forward)")]
    if all("speedup" in row for f in formats for row in out["formats"][f]["summary"].values()):
        panels.append(("speedup", "speedup_", "speedup over constrained ar (batch 1)"))
    width = 0.8 / len(formats)
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 3.8), squeeze=False)
    for ax, (key, prefix, label) in zip(axes[0], panels):
        for j, fmt in enumerate(formats):
            summary = out["formats"][fmt]["summary"]
            colour = f"C{j}"
            for i, variant in enumerate(variants):
                if variant not in summary:
                    continue
                row = summary[variant]
                x = i - 0.4 + width * (j + 0.5)
                ax.scatter([x] * len(row[key]), row[key], color=colour, alpha=0.5, s=14, zorder=3)
                ax.errorbar([x], [row[prefix + "mean"]], yerr=[row[prefix + "std"]], fmt="o",
                            color=colour, capsize=5, zorder=4, label=fmt if i == 0 else None)
        ax.set_xticks(range(len(variants)), variants, rotation=20)
        ax.set(ylabel=label)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].legend(title="token format")
    fig.suptitle(f"{out['dataset']} ({out['preset']}): draft heads by token format, mean +- std "
                 f"over seeds, {out['users']} users, K={out['k']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--variants", type=lambda s: s.split(","), default=["eagle", "padrec"])
    ap.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--users", type=int, default=2000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--steps", type=int, default=None, help="override the preset's head steps (smoke runs)"
    )
    ap.add_argument(
        "--head-users", type=int, default=None, help="override the preset's distillation users"
    )
    ap.add_argument(
        "--train-unroll",
        type=int,
        default=None,
        help="unroll this many steps in training instead of K (1 = teacher forcing, the EAGLE-1 "
        "recipe); decoding still drafts K tokens",
    )
    ap.add_argument(
        "--step-decay",
        type=float,
        default=None,
        help="unrolled loss: step k weighs step_decay**(k-1) (default: HeadTrainConfig's)",
    )
    ap.add_argument("--unconstrained", action="store_true",
                    help="decode without the catalog constraint (the default decodes under it, "
                    "as `padrec bench` does)")
    ap.add_argument("--bench-users", type=int, default=0,
                    help="after training, time plain decoding and every head side by side on "
                    "this many users (batch 1, `padrec bench`'s method) for each head's speedup")
    ap.add_argument(
        "--topk-distill",
        type=int,
        default=None,
        help="HASS-style distillation on the target's top-M tokens (train.heads): M, 0 = off; "
        "default: the build's recipe (HeadTrainConfig.topk_distill)",
    )
    ap.add_argument("--heads-out", default="runs/study-heads")
    ap.add_argument("--json", required=True)
    ap.add_argument("--merge", nargs="+", default=None, help="merge study JSON files into --json")
    ap.add_argument("--compare", nargs="+", default=None,
                    help="merged study JSON files of one dataset, one per token format")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    if args.merge:
        merge(args)
        return
    if args.compare:
        compare(args)
        return
    unknown = [v for v in args.variants if v not in HEAD_VARIANTS]
    if unknown or not args.artifacts:
        ap.error(f"need --artifacts and known variants (unknown: {unknown})")
    run_study(args)


if __name__ == "__main__":
    main()
