"""Memory of vLLM's CPU GEMMs as new matrix shapes arrive: where the worker's growth under load
comes from, and what bounds it.

vLLM's CPU build runs every unquantized linear layer through oneDNN (``vllm._custom_ops.
create_onednn_mm`` / ``onednn_mm``). Each layer keeps its own LRU of 32 matmul primitives keyed by
the row count M, and oneDNN keeps a process-wide primitive cache of its own
(``ONEDNN_PRIMITIVE_CACHE_CAPACITY``, 1024 primitives by default) keyed by the full shape. Under
a server's load M is the step's token count, which takes hundreds of values, so new primitives
keep arriving long after start-up; this script shows how the resident memory follows them.

It builds a few linear layers of one shape, then feeds blocks of 32 new M values each (and the
first 32 again, as a server revisits common batch sizes), printing ``RssAnon`` after every
block. Run it once per capacity to compare; each run is a fresh process, since oneDNN reads the
variable once:

    python scripts/onednn_cache_growth.py --blocks 40
    ONEDNN_PRIMITIVE_CACHE_CAPACITY=256 python scripts/onednn_cache_growth.py --blocks 40
"""

from __future__ import annotations

import argparse
import os
import sys
import time


def rss_anon_mb() -> float:
    """This process's anonymous resident memory in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no RssAnon in /proc/self/status")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=40, help="blocks of 32 new M values")
    ap.add_argument("--layers", type=int, default=4, help="linear layers of one shape")
    ap.add_argument("--n", type=int, default=768, help="output features")
    ap.add_argument("--k", type=int, default=256, help="input features")
    args = ap.parse_args()

    import torch

    try:
        from vllm import _custom_ops as ops
    except ImportError:
        sys.exit("onednn_cache_growth: needs vLLM's CPU build (make setup)")
    if not getattr(ops, "_supports_onednn", False):
        sys.exit("onednn_cache_growth: this vLLM build has no oneDNN GEMM")

    torch.set_num_threads(1)
    # [K, N] weights as vLLM passes them (``origin_weight.t()``)
    layers = [ops.create_onednn_mm(torch.randn(args.n, args.k).t(), 32)
              for _ in range(args.layers)]
    capacity = os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "default (1024)")
    print(f"ONEDNN_PRIMITIVE_CACHE_CAPACITY={capacity}, {args.layers} layers of "
          f"[{args.k} -> {args.n}], LD_PRELOAD={os.environ.get('LD_PRELOAD', '')}")
    base = rss_anon_mb()
    print(f"{'distinct M':>10}  {'RssAnon MB':>10}  {'growth MB':>9}")
    for block in range(args.blocks):
        new = range(1 + 32 * block, 33 + 32 * block)
        for m in [*new, *range(1, 33)]:
            x = torch.randn(m, args.k)  # [M, K]
            for layer in layers:
                ops.onednn_mm(layer, x, None)  # [M, N]
        now = rss_anon_mb()
        print(f"{32 * (block + 1):>10}  {now:>10.0f}  {now - base:>+9.0f}", flush=True)
    # Cost of a GEMM whose primitive the layer's LRU lacks against the same GEMM once the LRU
    # holds it: M = 33..64 (the second block's shapes), after M = 1..32 displaced them from every
    # layer's LRU. Best of 5: from the second round on, oneDNN's cache holds them unless its
    # capacity is 0, so the first figure is a fetch from that cache, or with capacity 0 the cost
    # of creating the primitive again.
    xs = {m: torch.randn(m, args.k) for m in range(1, 65)}  # [M, K]
    timings = []
    for _ in range(5):
        for m in range(1, 33):
            for layer in layers:
                ops.onednn_mm(layer, xs[m], None)
        for _ in ("outside the LRU", "in the LRU"):
            t0 = time.perf_counter()
            for m in range(33, 65):
                for layer in layers:
                    ops.onednn_mm(layer, xs[m], None)
            timings.append((time.perf_counter() - t0) / (32 * len(layers)))
    fetched, held = min(timings[0::2]), min(timings[1::2])
    print(f"per GEMM, M = 33..64: {1e3 * fetched:.3f} ms when the layer's LRU lacks the primitive, "
          f"{1e3 * held:.3f} ms when it holds it (best of 5)")


if __name__ == "__main__":
    main()
