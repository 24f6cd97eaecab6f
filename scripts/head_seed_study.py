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
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.bench import bench_users
from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.tokens import EOS_ID
from padrec_vllm.data.s3rec import leave_one_out, load_dataset
from padrec_vllm.decoding import aggregate, generate, identical_output_rate
from padrec_vllm.eval.evaluate import max_new_tokens
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
    catalog = Catalog.load(paths.root)
    split = leave_one_out(load_dataset(info["dataset"], args.data_dir).sequences)
    target = load_target(paths.target, device=args.device)
    limit = max_new_tokens(catalog, preset.list_len)
    users = bench_users(split, catalog, preset.history, args.users)
    prompts = [list(p) for p in users.prompts]
    batch = 256 if args.device.startswith("cuda") else 16
    plain = generate(
        target, prompts, max_new_tokens=limit, eos_id=EOS_ID, batch_size=batch, progress="plain"
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
        "users": len(prompts),
        "k": preset.num_draft_tokens,
        "head_steps": preset.head_steps,
        "head_batch_size": preset.head_batch_size,
        "distill_sequences": len(data.tokens),
        "distill_s": time.perf_counter() - t0,
        "runs": [],
    }
    names = catalog.layout.slot_labels()
    for seed in args.seeds:
        for variant in args.variants:
            unroll = args.train_unroll or preset.num_draft_tokens
            cfg = variant_config(variant, unroll, preset.head_steps, preset.head_batch_size, seed)
            if args.step_decay is not None:
                cfg = replace(cfg, step_decay=args.step_decay)
            tag = (f"-k{unroll}" if args.train_unroll else "") + (
                f"-d{cfg.step_decay:g}" if args.step_decay is not None else ""
            )
            head_dir = Path(args.heads_out) / f"{variant}{tag}-s{seed}"
            rep = train_head(target, catalog, data, cfg, head_dir, args.device)
            head = load_head(head_dir, device=args.device, dtype=torch.float32).eval()
            res = generate(
                target,
                prompts,
                max_new_tokens=limit,
                eos_id=EOS_ID,
                batch_size=batch,
                head=decoding_head(head, target),
                num_draft_tokens=preset.num_draft_tokens,
                progress=f"decode {variant} s{seed}",
            )
            agg = aggregate(res)
            out["runs"].append(
                {
                    "variant": variant + tag,
                    "seed": seed,
                    "train_unroll": unroll,
                    "step_decay": cfg.step_decay,
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


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per variant: tau of every seed, mean, sample std, and the paired difference to eagle."""
    by_variant: dict[str, dict[int, float]] = {}
    for r in runs:
        by_variant.setdefault(r["variant"], {})[r["seed"]] = r["tau"]
    eagle = by_variant.get("eagle", {})
    summary = {}
    for variant, taus in by_variant.items():
        vals = [taus[s] for s in sorted(taus)]
        row = {
            "seeds": sorted(taus),
            "tau": vals,
            "mean": statistics.mean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
        }
        paired = [taus[s] / eagle[s] - 1 for s in sorted(taus) if s in eagle]
        if variant != "eagle" and paired:
            row["vs_eagle_same_seed"] = paired
            row["vs_eagle_mean"] = statistics.mean(paired)
        summary[variant] = row
    return summary


def merge(args) -> None:
    parts = [json.loads(Path(p).read_text()) for p in args.merge]
    out = {k: v for k, v in parts[0].items() if k != "runs"}
    out["runs"] = sorted(
        (r for p in parts for r in p["runs"]), key=lambda r: (r["variant"], r["seed"])
    )
    out["summary"] = summarize(out["runs"])
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    for variant, row in out["summary"].items():
        extra = (
            f"  vs eagle (same seed) {100 * row['vs_eagle_mean']:+.2f}%"
            if "vs_eagle_mean" in row
            else ""
        )
        taus = ", ".join(f"{t:.3f}" for t in row["tau"])
        print(f"{variant:16s} tau {row['mean']:.4f} +- {row['std']:.4f}  ({taus}){extra}")
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
    ap.add_argument("--heads-out", default="runs/study-heads")
    ap.add_argument("--json", required=True)
    ap.add_argument("--merge", nargs="+", default=None, help="merge study JSON files into --json")
    ap.add_argument("--plot", default=None)
    args = ap.parse_args()
    if args.merge:
        merge(args)
        return
    unknown = [v for v in args.variants if v not in HEAD_VARIANTS]
    if unknown or not args.artifacts:
        ap.error(f"need --artifacts and known variants (unknown: {unknown})")
    run_study(args)


if __name__ == "__main__":
    main()
