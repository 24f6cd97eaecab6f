"""Where vLLM's worker spends a speculative round: a py-spy profile split into named parts.

Run a vLLM bench, attach py-spy to the worker process once the measured method is decoding, then
split the samples by the vLLM functions on their stacks (a sample counts for the first part,
in the order of ``PARTS``, whose function is on its stack):

    padrec bench --artifacts A --engine vllm --methods ar,padrec --users 200 --batch-size 1 &
    py-spy record --pid <VLLM::Worker pid> --duration 25 --rate 50 --format raw -o worker.raw
    python scripts/vllm_time_split.py worker.raw --json F

Shares are of all the worker's samples (idle waits included: the worker spins on its queue).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

# (part, function name as py-spy prints it); the first match on a stack wins
PARTS = (
    ("drafter: head forward (compiled graph)", "EagleLlamaForCausalLM.forward"),
    ("drafter: draft logits, list mask, argmax", "SpecDecodeBaseProposer._sample_draft_tokens"),
    ("drafter: inputs and attention metadata", "SpecDecodeBaseProposer.propose"),
    ("drafter: vLLM's bookkeeping", "GPUModelRunner.propose_draft_token_ids"),
    ("drafter: list states (padrec hook)", "_propose_hook.<locals>.propose_draft_token_ids"),
    ("target: rejection sampling, bookkeeping", "GPUModelRunner.sample_tokens"),
    ("target forward", "GPUModelRunner._model_forward"),
    ("target: inputs and metadata", "GPUModelRunner.execute_model"),
    ("waiting for the engine core", "MessageQueue.dequeue"),
    ("sending outputs", "MessageQueue.enqueue"),
)


def split(lines: list[str]) -> tuple[int, Counter]:
    """(total samples, samples per part) of py-spy ``--format raw`` lines."""
    total, parts = 0, Counter()
    for line in lines:
        stack, _, count = line.rstrip().rpartition(" ")
        if not stack or not count.isdigit():
            continue
        total += int(count)
        names = {frame.split(" (")[0] for frame in stack.split(";")}
        part = next((p for p, fn in PARTS if fn in names), "other")
        parts[part] += int(count)
    return total, parts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("raw", help="py-spy record --format raw output of the vLLM worker")
    ap.add_argument("--json", default=None, help="write the split here")
    args = ap.parse_args(argv)
    path = Path(args.raw)
    if not path.is_file():
        sys.exit(f"error: no profile at {path}")
    total, parts = split(path.read_text().splitlines())
    if total == 0:
        sys.exit(f"error: {path} holds no py-spy raw samples")
    shares = {p: round(parts[p] / total, 3) for p, _ in PARTS + (("other", ""),)}
    for part, share in shares.items():
        print(f"{100 * share:5.1f}%  {part}")
    if args.json:
        record = {"samples": total, "shares": shares}
        Path(args.json).write_text(json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
