"""Per-request decoding figures and their aggregate (DESIGN.md section 5).

Definitions (all engines of this package report these):
- ``tokens``: the completion only, ``eos`` included when it was produced; at most
  ``max_new_tokens`` ids.
- ``target_forwards``: target forwards during decoding (prefill excluded). Prefill emits the first
  token, so ``tau = (len(tokens) - 1) / target_forwards`` (0.0 when the request ended at prefill).
  Plain greedy has tau == 1.
- ``draft_forwards``: head forwards (draft steps) of the rounds the request took part in: K a
  round, fewer when a confidence threshold ends a round's chain early.
- ``accept_by_pos[j]`` = (accepted, proposed) for draft position j+1 over all rounds: every round
  proposes K drafts (fewer when a confidence threshold ends the chain early; then only rounds that
  proposed position j+1 count it); position j+1 counts as accepted when drafts 1..j+1 all agree
  with the target (vLLM's per-position counter). Counts are of agreement with the target, before clipping at
  ``eos`` / ``max_new_tokens``.
- ``accept_by_slot[s]`` = (accepted, proposed) over drafted tokens whose id has slot s that the
  target actually judged: drafts 1..a+1 of a round that accepted a (the drafts after the first
  rejection are not counted). So accepted/proposed is the acceptance rate of a draft of slot s
  given that the chain reached it. Empty without a slot table.
- ``prefill_s`` / ``draft_s`` / ``verify_s``: wall-clock seconds of the target prefill, of the
  head's forwards (all K steps plus argmax), and of the target's verify forward plus acceptance
  bookkeeping (for plain greedy: each decode forward). Each timed batch-level phase is divided
  evenly among the rows that took part in it (finished rows leave the batch).
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class RequestResult:
    tokens: list[int]
    tau: float
    accept_by_pos: list[tuple[int, int]]
    accept_by_slot: dict[int, tuple[int, int]]
    target_forwards: int
    draft_forwards: int
    prefill_s: float
    draft_s: float
    verify_s: float

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.draft_s + self.verify_s


@dataclass(frozen=True)
class Aggregate:
    num_requests: int
    num_tokens: int
    tau: float  # decode tokens / target decode forwards, over all requests
    accept_by_pos: list[tuple[int, int]]
    accept_rate_by_pos: list[float]
    accept_by_slot: dict[int, tuple[int, int]]
    accept_rate_by_slot: dict[int, float]
    target_forwards: int
    draft_forwards: int
    prefill_s: float
    draft_s: float
    verify_s: float
    total_s: float = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "total_s", self.prefill_s + self.draft_s + self.verify_s)


def _rate(accepted: int, proposed: int) -> float:
    return accepted / proposed if proposed else 0.0


def aggregate(results: list[RequestResult]) -> Aggregate:
    """Sum the figures of ``results`` (tau and rates are ratios of sums, not means of ratios)."""
    num_pos = max((len(r.accept_by_pos) for r in results), default=0)
    by_pos = [
        (
            sum(r.accept_by_pos[j][0] for r in results if j < len(r.accept_by_pos)),
            sum(r.accept_by_pos[j][1] for r in results if j < len(r.accept_by_pos)),
        )
        for j in range(num_pos)
    ]
    by_slot: dict[int, tuple[int, int]] = {}
    for r in results:
        for slot, (acc, prop) in r.accept_by_slot.items():
            a0, p0 = by_slot.get(slot, (0, 0))
            by_slot[slot] = (a0 + acc, p0 + prop)
    forwards = sum(r.target_forwards for r in results)
    decode_tokens = sum(max(len(r.tokens) - 1, 0) for r in results)
    return Aggregate(
        num_requests=len(results),
        num_tokens=sum(len(r.tokens) for r in results),
        tau=decode_tokens / forwards if forwards else 0.0,
        accept_by_pos=by_pos,
        accept_rate_by_pos=[_rate(a, p) for a, p in by_pos],
        accept_by_slot=dict(sorted(by_slot.items())),
        accept_rate_by_slot={s: _rate(a, p) for s, (a, p) in sorted(by_slot.items())},
        target_forwards=forwards,
        draft_forwards=sum(r.draft_forwards for r in results),
        prefill_s=sum(r.prefill_s for r in results),
        draft_s=sum(r.draft_s for r in results),
        verify_s=sum(r.verify_s for r in results),
    )


def identical_output_rate(results: list[RequestResult], reference: list[RequestResult]) -> float:
    """Fraction of requests whose tokens equal the reference's (e.g. plain greedy)."""
    if len(results) != len(reference):
        raise ValueError(f"{len(results)} results against {len(reference)} references")
    if not results:
        return 1.0
    return sum(a.tokens == b.tokens for a, b in zip(results, reference)) / len(results)
