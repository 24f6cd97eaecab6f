"""How far from the target's token the heads' first draft is, by item slot: top-k hit rates.

On the bench's test users, the target's own greedy lists (what speculative decoding must
reproduce) are fed to each head teacher-forced (step 1: the target's features, as the first draft
of a round sees them). For every completion token the script records the rank of that token in
the head's logits and reports, per slot of the token, how often it is the head's top-1 (the chain's
acceptance of a first draft), or within its top 2, 4 and 8 (what a draft tree of that width at that
token would catch). Writes JSON; prints a table.

    python scripts/head_topk.py --artifacts artifacts/bench-Beauty --heads eagle,padrec \
        --users 500 --json runs/head-topk.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from padrec_vllm.bench import BenchConfig, bench_setup
from padrec_vllm.catalog.tokens import PAD_ID
from padrec_vllm.errors import UserError
from padrec_vllm.model.head_checkpoint import load_head
from padrec_vllm.model.target import load_target
from padrec_vllm.train.heads import DistillSet, build_distill_set, distill_batch

KS = (1, 2, 4, 8)


@torch.no_grad()
def head_ranks(
    head, target, data: DistillSet, slot_of: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank (0 = top-1) of every completion token under the head's step-1 logits, and its slot
    -> [N], [N].

    The inputs are those of step 1 of the training loss (``train.heads.unrolled_loss``)."""
    ranks, slots = [], []
    embed, lm_head = target.get_input_embeddings(), target.lm_head
    for start in range(0, len(data.tokens), batch):
        ids, feats, mask, pad = distill_batch(
            data, list(range(start, min(start + batch, len(data.tokens)))), "cpu"
        )
        b, t = ids.shape
        next_ids = torch.cat([ids[:, 1:], ids.new_full((b, 1), PAD_ID)], 1)  # [B, T]: x_{p+1}
        labels = torch.cat([ids[:, 2:], ids.new_full((b, 2), PAD_ID)], 1)  # [B, T]: x_{p+2}
        pos = torch.arange(t)[None].expand(b, t)  # [B, T]
        logits = head.logits(
            head(next_ids, feats, pos, step=1, embed=embed, attention_mask=pad), lm_head
        )  # [B, T, V]
        lg, want = (
            logits[mask],
            labels[mask],
        )  # [N, V], [N]: positions whose x_{p+2} is a completion token
        ranks.append((lg > lg.gather(1, want[:, None])).sum(1))  # [N]
        slots.append(slot_of[want])
    return torch.cat(ranks), torch.cat(slots)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--heads", default="eagle,padrec")
    ap.add_argument("--users", type=int, default=500)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    heads = args.heads.split(",")
    setup = bench_setup(
        BenchConfig(
            artifacts=Path(args.artifacts),
            methods=("ar", *heads),
            users=args.users,
            batch_size=1,
            data_dir=args.data_dir,
        )
    )  # the bench's users; checks the heads exist
    paths, catalog = setup.paths, setup.catalog
    target = load_target(paths.target, device="cpu")
    data = build_distill_set(target, setup.prompts, setup.limit, "cpu", 16)
    slot_of = catalog.layout.slot_tensor()
    names = catalog.layout.slot_labels()
    out = {
        "dataset": setup.info["dataset"],
        "preset": setup.info["preset"],
        "users": args.users,
        "ks": list(KS),
        "heads": {},
    }
    for name in heads:
        head = load_head(paths.head(name), device="cpu", dtype=torch.float32).eval()
        ranks, slots = head_ranks(head, target, data, slot_of, 16)
        per_slot = {}
        for s in sorted(set(slots.tolist())):
            r = ranks[slots == s]
            per_slot[names[s]] = {
                "tokens": len(r),
                **{f"top{k}": float((r < k).float().mean()) for k in KS},
            }
        out["heads"][name] = {
            "all": {f"top{k}": float((ranks < k).float().mean()) for k in KS},
            "by_slot": per_slot,
        }
        print(
            f"{name}: "
            + "  ".join(
                f"{s} " + "/".join(f"{v[f'top{k}']:.3f}" for k in KS) for s, v in per_slot.items()
            )
        )
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    try:
        main()
    except UserError as err:
        raise SystemExit(f"error: {err}") from None
