"""``padrec bench --engine reference``: plain decoding and speculative methods side by side.

Methods run round-robin batch by batch (``ar`` first in odd rounds, last in even ones), so
machine noise hits every method alike; a warm-up batch per method is excluded. Each head is
loaded once and turned once into its decoding form (``model.decoding_head``), the form the
reference server runs. ``head_forward_ms`` times one draft forward of each head
(``time_head_forwards``).

Constrained (the default, ``bench.setup``): ``ar`` is plain constrained greedy, the baseline;
``forced`` is plain decoding that appends forced tokens without a target forward
(``generate(..., skip_forced=True)``, no head); a head name drafts constrained chains, and
``HEAD:tN...`` constrained trees. Every run of a method on a batch gets fresh constraints for its
users.
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from padrec_vllm.bench.methods import parse_method
from padrec_vllm.bench.report import bench_result
from padrec_vllm.bench.setup import BenchConfig, MethodRun, bench_setup
from padrec_vllm.catalog.tokens import EOS_ID
from padrec_vllm.decoding import RequestResult, generate
from padrec_vllm.errors import UserError
from padrec_vllm.model.decoding_head import decoding_head
from padrec_vllm.model.head_checkpoint import load_head
from padrec_vllm.model.target import load_target

PLAIN = ("ar", "forced")  # methods without a head


def time_head_forwards(heads: dict, target, batch_size: int, repeats: int = 300) -> dict:
    """Milliseconds per draft forward of one token per row (cache of 64 positions) for each
    head: median of ``repeats`` calls, the heads interleaved call by call so machine noise hits
    all alike; 20 warm-up calls each are excluded."""
    if not heads:
        return {}
    device = next(target.parameters()).device
    hidden = target.config.hidden_size
    ids = torch.full((batch_size, 1), 5, dtype=torch.long, device=device)  # [B, 1]
    feats = torch.randn(batch_size, 1, hidden, device=device)  # [B, 1, H]
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


def run_reference_bench(cfg: BenchConfig) -> dict:
    """The bench JSON (``bench.report``) of ``cfg.methods`` on the reference engine."""
    if cfg.engine != "reference":
        raise UserError(f"unknown engine {cfg.engine!r} for the reference bench")
    setup = bench_setup(cfg)
    target = load_target(setup.paths.target, device=cfg.device)
    specs = {name: parse_method(name) for name in cfg.methods}
    loaded = {}  # spec.head_key -> the decoding form of that head
    for name, spec in specs.items():
        if name not in PLAIN and spec.head_key not in loaded:
            head = load_head(setup.paths.head(spec.head), device=cfg.device, dtype=torch.float32)
            loaded[spec.head_key] = decoding_head(head.eval(), target, int8=spec.int8)
    heads = {"ar": None} | {n: None if n in PLAIN else loaded[s.head_key]
                            for n, s in specs.items() if n != "ar"}
    prompts, k = setup.prompts, setup.num_draft_tokens

    def run(name: str, start: int) -> tuple[list[RequestResult], float]:
        head, spec = heads[name], specs[name]
        chunk = prompts[start : start + cfg.batch_size]
        constraints = setup.constraints(start, start + len(chunk))  # before the clock starts
        t0 = time.perf_counter()
        res = generate(target, chunk, max_new_tokens=setup.limit, eos_id=EOS_ID,
                       batch_size=len(chunk), head=head,
                       num_draft_tokens=k if head is not None else None,
                       min_draft_confidence=spec.min_confidence, tree=spec.tree,
                       constraints=constraints, skip_forced=name == "forced")
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        return res, time.perf_counter() - t0

    names = list(heads)
    for name in names:  # warm-up, excluded
        run(name, 0)
    results: dict[str, list[RequestResult]] = {n: [] for n in names}
    wall = {n: 0.0 for n in names}
    latency: dict[str, list[float]] = {n: [] for n in names}
    starts = range(0, len(prompts), cfg.batch_size)
    for i, start in enumerate(tqdm(starts, desc=f"bench {','.join(names)}", unit="batch")):
        for name in names if i % 2 == 0 else names[::-1]:
            res, secs = run(name, start)
            results[name] += res
            wall[name] += secs
            latency[name] += [1000 * secs] * len(res)
    runs = {n: MethodRun(results[n], wall[n], latency[n]) for n in names}
    timed = time_head_forwards(loaded, target, cfg.batch_size)
    head_ms = {n: timed[specs[n].head_key] for n in names if n not in PLAIN}
    return bench_result(cfg, setup, runs, head_ms, engine="reference")
