"""One accounting of decoding, shared by every engine, both benches and the server.

Every figure is defined here once; the reference engine feeds ``RequestAccounting`` as its rounds
happen, the vLLM engine and bench replay vLLM's per-request round counts into it
(``result_from_rounds``), and both get the same ``RequestResult``.

Per request:
- ``tokens``: the completion only, ``<eos>`` included when it was produced; at most
  ``max_new_tokens`` ids. The first token comes from the prefill forward.
- ``target_forwards``: target forwards after prefill. ``plain_forwards``: those of them that
  verified no draft (plain greedy decoding has only these; a speculative round whose drafter
  proposed nothing is one too). ``tau = decode_tokens / target_forwards`` with ``decode_tokens =
  len(tokens) - 1``: tokens emitted per decode forward (0.0 when the request ended at prefill);
  plain greedy has tau 1.
- ``forced_tokens``: decode tokens that were the only legal token under the request's catalog
  constraint (``catalog.constraint``) and that the engine appended without a target forward
  choosing them (skipped forced tokens). They count as emitted tokens in tau, so skipping raises
  tau: in plain decoding with skipping, ``target_forwards = decode_tokens - forced_tokens``, i.e.
  every forced token is a forward saved against plain constrained greedy. 0 for decoding that
  skips nothing (unconstrained, plain constrained greedy, vLLM's replayed rounds).
- ``draft_forwards``: head forwards (draft steps) of the rounds the request took part in.
- ``accept_by_pos[j] = (accepted, proposed)`` for draft position j + 1 over the rounds that
  proposed it; position j + 1 is accepted when drafts 1..j+1 all equal the target's tokens
  (vLLM's per-position counter). Counted before clipping at ``<eos>`` / ``max_new_tokens``.
  Its length is K (the draft-token count) for a speculative request and 0 otherwise.
- ``accept_by_slot[s] = (accepted, proposed)`` over the drafts the target judged, i.e. drafts
  1..a+1 of a round that accepted a (drafts after the first rejection are not judged), keyed by
  the slot of the *target's* token at the draft's position: exact for accepted drafts, and for the
  first rejected draft the slot the draft competed for. accepted / proposed is the acceptance rate
  of a draft of slot s given that the chain reached it. Empty without a slot table. The slot is
  ``SlotRule.completion_slot`` of the token's index in ``tokens`` (by id under the token rule;
  under the shared format's position rule a code token at index j has slot j mod (L + 1)).
- ``acceptance_histogram[a]``: rounds with drafts that accepted exactly a of them (length K + 1).
- ``queue_s``: waiting before the engine took the request; ``prefill_s``: until the first token;
  ``decode_s``: the rest; ``draft_s``: the part of ``decode_s`` spent in head forwards (0 where
  the engine does not time its drafter apart, as in vLLM). A batch-level phase is split evenly
  among the rows that took part in it.

Aggregates (``aggregate``) are ratios of sums over requests, not means of ratios.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from padrec_vllm.catalog.tokens import PER_LEVEL, SlotRule

Slots = SlotRule | Sequence[int] | None  # a rule, or a [V] table of slots by token id


def slot_rule_of(slots: Slots) -> SlotRule | None:
    """``slots`` as a ``SlotRule`` (a bare table is the per-level token rule)."""
    if slots is None or isinstance(slots, SlotRule):
        return slots
    table = tuple(int(s) for s in slots)
    return SlotRule(PER_LEVEL, table, max(table) + 1)


@dataclass(frozen=True)
class RequestResult:
    """One request's completion and figures (module docstring)."""

    tokens: list[int]
    target_forwards: int
    plain_forwards: int = 0
    draft_forwards: int = 0
    forced_tokens: int = 0
    accept_by_pos: list[tuple[int, int]] = field(default_factory=list)
    accept_by_slot: dict[int, tuple[int, int]] = field(default_factory=dict)
    queue_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    draft_s: float = 0.0

    @property
    def decode_tokens(self) -> int:
        return max(len(self.tokens) - 1, 0)

    @property
    def tau(self) -> float:
        return self.decode_tokens / self.target_forwards if self.target_forwards else 0.0

    @property
    def speculative(self) -> bool:
        """Decoded with a drafter (K draft positions reported), not plainly."""
        return bool(self.accept_by_pos)

    @property
    def num_draft_tokens(self) -> int:
        """K the request was decoded with (``len(accept_by_pos)``); 0 when plain."""
        return len(self.accept_by_pos)

    @property
    def draft_tokens(self) -> int:
        return sum(p for _, p in self.accept_by_pos)

    @property
    def accepted_tokens(self) -> int:
        return sum(a for a, _ in self.accept_by_pos)

    @property
    def verify_s(self) -> float:
        return self.decode_s - self.draft_s

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def acceptance_histogram(self) -> tuple[int, ...]:
        if not self.accept_by_pos:
            return ()
        rounds = self.accept_by_pos[0][1]  # every round with drafts proposes position 1
        at_least = [rounds] + [a for a, _ in self.accept_by_pos] + [0]  # rounds accepting >= j
        return tuple(at_least[j] - at_least[j + 1] for j in range(len(self.accept_by_pos) + 1))


class RequestAccounting:
    """The figures of one request while it decodes; ``result()`` freezes them.

    ``num_draft_tokens`` is K (0 for plain decoding); ``slot_of_token`` (a ``SlotRule``, or a [V]
    table of slots by token id), when given, enables ``accept_by_slot``.
    """

    def __init__(self, num_draft_tokens: int, slot_of_token: Slots = None):
        self.slot_rule = slot_rule_of(slot_of_token)
        self.tokens: list[int] = []
        self.target_forwards = 0
        self.plain_forwards = 0
        self.draft_forwards = 0
        self.forced_tokens = 0
        self.by_pos = [[0, 0] for _ in range(num_draft_tokens)]
        self.by_slot: dict[int, list[int]] = {}
        self.prefill_s = 0.0
        self.decode_s = 0.0
        self.draft_s = 0.0

    def emit(self, new_tokens: Sequence[int], max_new_tokens: int, eos_id: int | None,
             forced: Sequence[bool] = ()) -> bool:
        """Append tokens up to ``<eos>`` / the budget; True when the request is finished.
        ``forced[j]`` (default False) marks ``new_tokens[j]`` as a skipped forced token."""
        for j, tok in enumerate(new_tokens):
            self.tokens.append(tok)
            self.forced_tokens += j < len(forced) and bool(forced[j])
            if tok == eos_id or len(self.tokens) >= max_new_tokens:
                return True
        return False

    def plain_forward(self) -> None:
        """One target forward that verified no draft."""
        self.target_forwards += 1
        self.plain_forwards += 1

    def round(self, proposed: int, accepted: int, target_tokens: Sequence[int],
              head_steps: int, first: int | None = None) -> None:
        """One verify forward over ``proposed`` drafts of which ``accepted`` were kept.

        ``target_tokens`` are the target's tokens at draft positions 1..accepted+1 (the round's
        emitted tokens; fewer where the engine no longer has them, which only shortens the slot
        counts); ``head_steps`` the head forwards the round ran; ``first`` the index in
        ``tokens`` of ``target_tokens[0]`` (default: the next token to emit).
        """
        first = len(self.tokens) if first is None else first
        self.draft_forwards += head_steps
        if proposed == 0:
            self.plain_forward()
            return
        self.target_forwards += 1
        for j in range(min(proposed, len(self.by_pos))):
            self.by_pos[j][1] += 1
            self.by_pos[j][0] += j < accepted
        if self.slot_rule is not None:
            for j in range(min(accepted + 1, proposed, len(target_tokens))):
                slot = self.slot_rule.completion_slot(first + j, target_tokens[j])
                acc_prop = self.by_slot.setdefault(slot, [0, 0])
                acc_prop[0] += j < accepted
                acc_prop[1] += 1

    def result(self, queue_s: float = 0.0) -> RequestResult:
        return RequestResult(
            tokens=list(self.tokens),
            target_forwards=self.target_forwards,
            plain_forwards=self.plain_forwards,
            draft_forwards=self.draft_forwards,
            forced_tokens=self.forced_tokens,
            accept_by_pos=[(a, p) for a, p in self.by_pos],
            accept_by_slot={s: (a, p) for s, (a, p) in sorted(self.by_slot.items())},
            queue_s=queue_s,
            prefill_s=self.prefill_s,
            decode_s=self.decode_s,
            draft_s=self.draft_s,
        )


def result_from_rounds(
    tokens: Sequence[int],
    accepted: Sequence[int],
    proposed: Sequence[int],
    num_draft_tokens: int,
    slot_of_token: Slots,
    *,
    queue_s: float = 0.0,
    prefill_s: float = 0.0,
    decode_s: float = 0.0,
) -> RequestResult:
    """A request's figures from its per-round counts, as vLLM reports them.

    ``accepted[r]`` / ``proposed[r]``: drafts kept / proposed in verify round r (vLLM records only
    rounds with drafts). The first token comes from prefill and round r emits ``accepted[r] + 1``
    tokens, so round r's tokens sit right after the previous rounds'. Decoded tokens that no
    recorded round covers came from forwards without drafts (counted as plain forwards, one token
    each); then the rounds cannot be placed in ``tokens`` and ``accept_by_slot`` stays empty.
    Each round counts ``proposed[r]`` head forwards. Without speculation pass empty lists and K = 0.
    """
    decoded = max(len(tokens) - 1, 0)
    covered = sum(a + 1 for a in accepted)
    aligned = covered >= decoded
    acct = RequestAccounting(num_draft_tokens, slot_of_token if aligned else None)
    acct.tokens = list(tokens)
    pos = 1  # index in ``tokens`` of the round's first token
    for a, d in zip(accepted, proposed):
        acct.round(d, a, tokens[pos : pos + a + 1] if aligned else (), head_steps=d, first=pos)
        pos += a + 1
    for _ in range(decoded - covered):
        acct.plain_forward()
    acct.prefill_s, acct.decode_s = prefill_s, decode_s
    return acct.result(queue_s=queue_s)


@dataclass(frozen=True)
class Aggregate:
    """Sums over requests (``aggregate``); rates are ratios of sums."""

    num_requests: int
    num_tokens: int
    tau: float  # decode tokens / target decode forwards, over all requests
    accept_by_pos: list[tuple[int, int]]
    accept_rate_by_pos: list[float]
    accept_by_slot: dict[int, tuple[int, int]]
    accept_rate_by_slot: dict[int, float]
    target_forwards: int
    plain_forwards: int
    draft_forwards: int
    prefill_s: float
    draft_s: float
    verify_s: float
    forced_tokens: int = 0  # skipped forced tokens, over all requests

    @property
    def total_s(self) -> float:
        return self.prefill_s + self.draft_s + self.verify_s


def _rate(accepted: int, proposed: int) -> float:
    return accepted / proposed if proposed else 0.0


def aggregate(results: Sequence[RequestResult]) -> Aggregate:
    """Sum the figures of ``results``."""
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
    decode_tokens = sum(r.decode_tokens for r in results)
    return Aggregate(
        num_requests=len(results),
        num_tokens=sum(len(r.tokens) for r in results),
        tau=decode_tokens / forwards if forwards else 0.0,
        accept_by_pos=by_pos,
        accept_rate_by_pos=[_rate(a, p) for a, p in by_pos],
        accept_by_slot=dict(sorted(by_slot.items())),
        accept_rate_by_slot={s: _rate(a, p) for s, (a, p) in sorted(by_slot.items())},
        target_forwards=forwards,
        plain_forwards=sum(r.plain_forwards for r in results),
        draft_forwards=sum(r.draft_forwards for r in results),
        prefill_s=sum(r.prefill_s for r in results),
        draft_s=sum(r.draft_s for r in results),
        verify_s=sum(r.verify_s for r in results),
        forced_tokens=sum(r.forced_tokens for r in results),
    )


def identical_output_rate(results: Sequence[RequestResult],
                          reference: Sequence[RequestResult]) -> float:
    """Fraction of requests whose tokens equal the reference's (e.g. plain greedy)."""
    if len(results) != len(reference):
        raise ValueError(f"{len(results)} results against {len(reference)} references")
    if not results:
        return 1.0
    return sum(a.tokens == b.tokens for a, b in zip(results, reference)) / len(results)
