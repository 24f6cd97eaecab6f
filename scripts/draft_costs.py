"""What a speculative round costs on this machine, piece by piece, measured side by side.

1. The target's verify forward by block width (1 = a plain decoding step), with the causal mask of
   a chain and with the tree mask of ``decoding.tree`` (a chain-shaped tree, so the same work),
   as ratios to the one-token forward.
2. One draft step (head forward + logits) of each head's decoding form, float32 against int8
   (``model.decoding_head``), each step right after a verify forward as in decoding (the verify
   streams the target's weights through the cache, so the head's weights are read cold).

Calls are interleaved call by call, so machine noise hits every variant alike; medians.

    python scripts/draft_costs.py --artifacts artifacts/bench-Beauty --heads eagle,padrec --json F
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.decoding.kv import TargetKV
from padrec_vllm.errors import UserError
from padrec_vllm.model.decoding_head import decoding_head
from padrec_vllm.model.head_checkpoint import load_head
from padrec_vllm.model.target import load_target

PREFIX = 60  # cached tokens before the block (a typical history prompt)


def _verify(target, width: int, tree: bool) -> float:
    """Seconds of one verify forward of ``width`` tokens over a ``PREFIX``-token cache."""
    device = next(target.parameters()).device
    kv = TargetKV(target, 1, device)
    kv.forward_block(torch.randint(5, 300, (1, PREFIX), device=device))
    kv.keep(torch.tensor([PREFIX], device=device))
    block = torch.randint(5, 300, (1, width), device=device)  # [1, W]
    depths = torch.arange(width, device=device)[None] if tree else None  # [1, W]
    mask = (
        torch.ones(width, width, dtype=torch.bool, device=device).tril()[None] if tree else None
    )  # [1, W, W]
    t0 = time.perf_counter()
    feats = kv.forward_block(block, depths, mask)  # [1, W, H]
    target.lm_head(feats).argmax(-1)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--artifacts", required=True)
    ap.add_argument("--heads", default="eagle,padrec")
    ap.add_argument("--widths", default="1,2,3,4,5,6,7,8,9,12,16")
    ap.add_argument("--repeats", type=int, default=60)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    try:
        paths = ArtifactPaths(Path(args.artifacts))
        target = load_target(paths.target)
        heads = {}
        for name in args.heads.split(","):
            if not (paths.head(name) / "config.json").exists():
                raise UserError(f"no head {name!r} at {paths.head(name)}")
            head = load_head(paths.head(name), dtype=torch.float32).eval()
            heads[name] = decoding_head(head, target)
            heads[f"{name}+int8"] = decoding_head(head, target, int8=True)
        widths = [int(w) for w in args.widths.split(",")]
    except (UserError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    embed = target.get_input_embeddings()
    hidden = target.config.hidden_size
    verify = {(w, tree): [] for w in widths for tree in (False, True)}
    step = {name: [] for name in heads}
    caches = {name: h.new_cache(1, 128) for name, h in heads.items()}
    ids = torch.full((1, 1), 5)  # [1, 1]
    feats = torch.randn(1, 1, hidden)  # [1, 1, H]
    pos = torch.full((1, 1), PREFIX)  # [1, 1]
    with torch.inference_mode():
        for i in tqdm(range(args.repeats + 3), desc="draft costs", unit="round"):
            for key, times in verify.items():
                secs = _verify(target, *key)
                if i >= 3:  # warm-up rounds excluded
                    times.append(secs)
            for name, head in heads.items():
                _verify(target, 5, False)  # what precedes a draft step in decoding
                t0 = time.perf_counter()
                head.logits(
                    head(ids, feats, pos, step=2, embed=embed, cache=caches[name]), target.lm_head
                ).argmax(-1)
                if i >= 3:
                    step[name].append(time.perf_counter() - t0)

    ms = {k: 1000 * statistics.median(v) for k, v in verify.items()}
    one = ms[(1, False)]
    result = {
        "verify_ms": {
            "causal": {w: ms[(w, False)] for w in widths},
            "tree": {w: ms[(w, True)] for w in widths},
        },
        "verify_ratio_to_one_token": {
            "causal": {w: ms[(w, False)] / one for w in widths},
            "tree": {w: ms[(w, True)] / one for w in widths},
        },
        "draft_step_ms": {n: 1000 * statistics.median(v) for n, v in step.items()},
        "prefix_tokens": PREFIX,
        "repeats": args.repeats,
        "threads": torch.get_num_threads(),
    }
    print(f"verify forward, {PREFIX}-token cache: "
          "width  causal ms (x one token)  tree ms (x one token)")
    for w in widths:
        causal, tree = ms[(w, False)], ms[(w, True)]
        print(f"  {w:3d}  {causal:7.2f} ({causal / one:4.2f}x)  {tree:7.2f} ({tree / one:4.2f}x)")
    print("draft step (head + logits) after a verify forward:")
    for name in heads:
        if not name.endswith("+int8"):
            f32, i8 = result["draft_step_ms"][name], result["draft_step_ms"][f"{name}+int8"]
            print(f"  {name:16s} float32 {f32:.3f} ms  int8 {i8:.3f} ms  ({i8 / f32:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
