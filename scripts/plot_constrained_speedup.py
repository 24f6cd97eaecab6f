"""Bar plot of constrained speedups over plain constrained greedy, per dataset and method, from
``padrec bench`` JSON files (reference engine, one batch size).

    python scripts/plot_constrained_speedup.py OUT.png BENCH.json [BENCH.json ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(out: str, paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    methods = [m for m in runs[0]["methods"]  # those every run has
               if m != "ar" and all(m in r["methods"] for r in runs)]
    width = 0.8 / len(methods)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for j, name in enumerate(methods):
        xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(runs))]
        ys = [r["methods"][name]["speedup"] for r in runs]
        bars = ax.bar(xs, ys, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xticks(range(len(runs)), [r["dataset"] for r in runs])
    ax.set_ylabel("speedup over constrained ar")
    r0 = runs[0]
    ax.set_title(f"{r0['engine']} engine, batch {r0['batch_size']}, K={r0['num_draft_tokens']}, "
                 "constrained lists", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__.strip())
    main(sys.argv[1], sys.argv[2:])
