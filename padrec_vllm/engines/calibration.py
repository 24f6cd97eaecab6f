"""Start-up calibration: decoding speed measured at each batch size and draft length K, one
engine, and the draft-length schedule that follows from it.

A *point* (batch size b, K) runs ``b`` closed-loop clients against a started engine whose
schedule is ``K`` at every batch size (``Engine.set_schedule``): each client sends its next prompt
as soon as its last one is answered, as users of a server do, until ``requests`` prompts are done
(at least ``2 b``, so every client sends twice). Every point of one batch size decodes the same
prompts, so their wall clocks compare directly (and their tokens must agree: lossless).

``calibrate(..., choose=True)`` (``PADREC_SPEC_SCHEDULE=auto``) measures K = 0..K_max at batch
sizes 1, 2, 4, ... up to the engine's batch, then measures K = 0 and the fastest K again in
reverse order (the machine drifts; the second pass halves what drift does to the choice) and keeps
for each batch size the fastest K, provided it beats K = 0 by ``margin`` (default 3%) over both
passes; otherwise that batch size decodes plain. Batch size b's K covers the sizes from the
previous measured size + 1 to b; sizes past the last measured one keep its K.
``choose=False`` (an explicit schedule) measures only K = 0 and the schedule's K at each size: the
figures without changing anything.

What K = 0 means differs by engine: the reference engine then decodes without the head (plain
constrained greedy, forced tokens skipped); vLLM keeps its drafter's pass over the verified tokens
(so that its KV cache stays in step) and only proposes no drafts, so K = 0 there costs a little
more than an engine started without a head.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass

from padrec_vllm.decoding.accounting import RequestResult
from padrec_vllm.engines.schedule import OPEN, SpecRange, SpecSchedule

DEFAULT_MARGIN = 0.03  # a K > 0 must beat K = 0 by this fraction of wall clock to be chosen


@dataclass(frozen=True)
class Point:
    """One measured (batch size, K): ``requests`` prompts through ``batch_size`` clients."""

    batch_size: int
    k: int
    requests: int
    seconds: float  # wall clock, summed over passes
    decode_tokens: int  # summed over passes
    target_forwards: int
    decode_s: float  # summed engine decode seconds of the requests
    identical: bool  # every completion equals the K = 0 point's

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0

    @property
    def tau(self) -> float:
        return self.decode_tokens / self.target_forwards if self.target_forwards else 0.0


@dataclass(frozen=True)
class Calibration:
    """What start-up calibration measured and the schedule it gives (module docstring)."""

    points: tuple[Point, ...]
    schedule: SpecSchedule  # chosen (``chosen``) or the explicit one that was measured
    chosen: bool
    seconds: float  # the whole calibration's wall clock
    margin: float = DEFAULT_MARGIN

    def point(self, batch_size: int, k: int) -> Point | None:
        return next((p for p in self.points if (p.batch_size, p.k) == (batch_size, k)), None)

    @property
    def batch_sizes(self) -> list[int]:
        return sorted({p.batch_size for p in self.points})

    def pairs(self) -> list[tuple[Point, Point]]:
        """(K = 0, schedule's K) points per measured batch size, where the schedule drafts."""
        out = []
        for b in self.batch_sizes:
            k = self.schedule.k_for(b)
            plain, spec = self.point(b, 0), self.point(b, k)
            if k and plain is not None and spec is not None:
                out.append((plain, spec))
        return out

    def speedup_at(self, batch_size: int) -> float:
        """Wall clock at K = 0 over wall clock at the schedule's K (1.0 where it is 0)."""
        plain = self.point(batch_size, 0)
        spec = self.point(batch_size, self.schedule.k_for(batch_size))
        if plain is None or spec is None or spec.seconds <= 0:
            return 1.0
        return plain.seconds / spec.seconds

    # --- the summary the server exports (sums over the batch sizes that speculate)

    @property
    def speedup(self) -> float:
        """K = 0 over the schedule's K, wall clock summed over the batch sizes that draft; 1.0
        when none does."""
        pairs = self.pairs()
        spec = sum(s.seconds for _, s in pairs)
        return sum(p.seconds for p, _ in pairs) / spec if spec > 0 else 1.0

    @property
    def tau(self) -> float:
        pairs = self.pairs()
        forwards = sum(s.target_forwards for _, s in pairs)
        return sum(s.decode_tokens for _, s in pairs) / forwards if forwards else 0.0

    @property
    def identical_rate(self) -> float:
        """Points whose completions equal their batch size's K = 0 point (1.0: lossless)."""
        return sum(p.identical for p in self.points) / len(self.points) if self.points else 1.0

    @property
    def requests(self) -> int:
        return sum(p.requests for p in self.points)

    def _s_per_token(self, which: int) -> float:
        pts = [pair[which] for pair in self.pairs()]
        tokens = sum(p.decode_tokens for p in pts)
        return sum(p.decode_s for p in pts) / tokens if tokens else 0.0

    @property
    def plain_s_per_token(self) -> float:
        """Engine decode seconds per token at K = 0 (batch sizes that draft)."""
        return self._s_per_token(0)

    @property
    def speculative_s_per_token(self) -> float:
        return self._s_per_token(1)

    def summary(self) -> dict:
        """The JSON of ``/readyz``'s ``calibration``."""
        return {
            "schedule": str(self.schedule),
            "chosen": self.chosen,
            "seconds": round(self.seconds, 2),
            "speedup": self.speedup,
            "tau": self.tau,
            "identical_rate": self.identical_rate,
            "requests": self.requests,
            "by_batch_size": [
                {"batch_size": b, "k": self.schedule.k_for(b), "speedup": self.speedup_at(b),
                 "requests_per_s": {str(p.k): round(p.requests_per_s, 3)
                                    for p in self.points if p.batch_size == b}}
                for b in self.batch_sizes
            ],
        }

    def table(self) -> str:
        """Markdown: requests/s per batch size (rows) and K (columns), the chosen K marked *."""
        ks = sorted({p.k for p in self.points})
        lines = ["| batch size | " + " | ".join(f"K={k} req/s" for k in ks)
                 + " | K in use | speedup |",
                 "|---:|" + "---:|" * (len(ks) + 2)]
        for b in self.batch_sizes:
            use = self.schedule.k_for(b)
            cells = []
            for k in ks:
                p = self.point(b, k)
                cell = "-" if p is None else f"{p.requests_per_s:.2f}"
                cells.append(cell + ("*" if k == use and p is not None else ""))
            lines.append(f"| {b} | " + " | ".join(cells)
                         + f" | {use} | {self.speedup_at(b):.2f}x |")
        return "\n".join(lines) + "\n"

    # --- storage

    def to_json(self) -> dict:
        return {"schedule": str(self.schedule), "chosen": self.chosen, "seconds": self.seconds,
                "margin": self.margin, "points": [asdict(p) for p in self.points]}

    @classmethod
    def from_json(cls, data: dict) -> Calibration:
        return cls(points=tuple(Point(**p) for p in data["points"]),
                   schedule=SpecSchedule.parse(data["schedule"]), chosen=bool(data["chosen"]),
                   seconds=float(data["seconds"]),
                   margin=float(data.get("margin", DEFAULT_MARGIN)))

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1)


def batch_sizes_up_to(max_batch: int) -> list[int]:
    """1, 2, 4, ... up to ``max_batch`` (``max_batch`` itself last when not a power of two)."""
    sizes, b = [], 1
    while b < max_batch:
        sizes.append(b)
        b *= 2
    return sizes + [max_batch]


def schedule_from(choice: dict[int, int]) -> SpecSchedule:
    """K by measured batch size -> a schedule: size b's K covers (previous size, b]; the last
    range stays open. Neighbours with the same K merge."""
    ranges: list[SpecRange] = []
    first = 1
    sizes = sorted(choice)
    for i, b in enumerate(sizes):
        last = OPEN if i == len(sizes) - 1 else b
        k = choice[b]
        if ranges and ranges[-1].k == k:
            ranges[-1] = SpecRange(ranges[-1].first, last, k)
        else:
            ranges.append(SpecRange(first, last, k))
        first = b + 1
    return SpecSchedule(tuple(ranges))


Generate = Callable[[list[int]], Awaitable[RequestResult]]


async def closed_loop(
    generate: Generate, prompts: Sequence[list[int]], clients: int
) -> tuple[float, list[RequestResult]]:
    """Wall clock and results (in prompt order) of ``clients`` closed-loop clients sharing
    ``prompts``."""
    results: list[RequestResult | None] = [None] * len(prompts)
    next_index = 0

    async def client() -> None:
        nonlocal next_index
        while next_index < len(prompts):
            i = next_index
            next_index += 1
            results[i] = await generate(prompts[i])

    t0 = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return time.perf_counter() - t0, results  # type: ignore[return-value]


async def calibrate(
    engine,
    prompts: Sequence[list[int]],
    max_new_tokens: int,
    *,
    constraint=None,
    max_k: int,
    schedule: SpecSchedule | None = None,
    requests: int = 16,
    max_batch: int | None = None,
    margin: float = DEFAULT_MARGIN,
    progress: Callable[[str], None] | None = None,
) -> Calibration:
    """Measure ``engine`` (started, ``Engine.set_schedule`` able to set K up to ``max_k``) and
    return the calibration; the engine is left on the resulting schedule.

    ``schedule`` None: choose K by batch size (module docstring); else measure K = 0 and that
    schedule's K. ``requests``: prompts per point at least (``2 b`` at batch size b); ``prompts``
    must hold as many as the largest point needs (``prompts_needed``)."""
    started = time.perf_counter()
    sizes = batch_sizes_up_to(max_batch or engine.config.max_batch_size)
    need = prompts_needed(requests, sizes[-1])
    if len(prompts) < need:
        raise ValueError(f"calibration needs {need} prompts, got {len(prompts)}")

    async def generate(prompt: list[int]) -> RequestResult:
        return await engine.generate(prompt, max_new_tokens, constraint)

    totals: dict[tuple[int, int], list] = {}  # (b, K) -> [seconds, results, passes], all passes
    reference: dict[int, list[list[int]]] = {}  # b -> K = 0 tokens
    same: dict[tuple[int, int], bool] = {}

    async def measure(b: int, k: int) -> None:
        await engine.set_schedule(SpecSchedule.fixed(k))
        batch = list(prompts[: max(requests, 2 * b)])
        seconds, results = await closed_loop(generate, batch, b)
        entry = totals.setdefault((b, k), [0.0, [], 0])
        entry[0] += seconds
        entry[1] += results
        entry[2] += 1
        tokens = [r.tokens for r in results]
        if k == 0:
            reference.setdefault(b, tokens)
        ok = reference.get(b, tokens) == tokens
        same[(b, k)] = same.get((b, k), True) and ok
        if progress is not None:
            rps = len(results) / seconds if seconds > 0 else 0.0
            progress(f"calibration: batch {b:3d}, K={k}: {rps:7.2f} requests/s")

    choice: dict[int, int] = {}
    for b in sizes:
        if schedule is None:
            candidates = list(range(0, max_k + 1))
        else:
            candidates = sorted({0, schedule.k_for(b)})
        for k in candidates:
            await measure(b, k)
        if schedule is None and len(candidates) > 1:
            fastest = min(candidates[1:], key=lambda k: totals[(b, k)][0])
            for k in (fastest, 0):  # second pass, reverse order
                await measure(b, k)
            plain_s = totals[(b, 0)][0] / totals[(b, 0)][2]
            spec_s = totals[(b, fastest)][0] / totals[(b, fastest)][2]
            choice[b] = fastest if spec_s < (1 - margin) * plain_s else 0
    final = schedule if schedule is not None else schedule_from(choice)
    await engine.set_schedule(final)
    final = engine.schedule  # as the engine clipped it

    points = []
    for (b, k), (seconds, results, passes) in sorted(totals.items()):
        points.append(Point(
            batch_size=b, k=k, requests=len(results), seconds=seconds,
            decode_tokens=sum(r.decode_tokens for r in results),
            target_forwards=sum(r.target_forwards for r in results),
            decode_s=sum(r.decode_s for r in results), identical=same[(b, k)],
        ))
    return Calibration(points=tuple(points), schedule=final, chosen=schedule is None,
                       seconds=time.perf_counter() - started, margin=margin)


def calibration_prompts(catalog, n: int, max_history: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of ``max_history`` catalog items drawn at random (fixed seed): the
    start-up warm-up and calibration prompts (``catalog``: a ``catalog.Catalog``)."""
    import random

    rng = random.Random(seed)
    items = sorted(catalog.item_to_sid)
    size = min(max_history, len(items))
    return [catalog.prompt_ids(rng.sample(items, size), max_history) for _ in range(n)]


def prompts_needed(requests: int, max_batch: int) -> int:
    """Prompts the calibration of ``requests`` per point up to ``max_batch`` clients uses."""
    return max(requests, 2 * max_batch)
