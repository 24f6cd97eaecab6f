"""The draft-length schedule: how many draft tokens (K) a round proposes, by batch size.

One setting for both engines. A schedule is a list of inclusive batch-size ranges, each with its
K; K = 0 means plain decoding (no drafts) at those batch sizes.

- Reference engine: a batch of n rows (requests taken together) decodes with ``k_for(n)``
  drafts per round, or without the head when that is 0. A batch keeps its K until it is done.
- vLLM engine: the schedule goes to vLLM's dynamic speculative decoding
  (``speculative_config["num_speculative_tokens_per_batch_size"]``, ``to_vllm``); vLLM's
  scheduler looks up K for the number of requests in each engine step, and the drafts proposed
  at the end of a step are verified in the next one.

Text form (``parse``, ``str``): ``off`` (K = 0 everywhere), ``K`` (one K at every batch size), or
comma-separated ranges ``A-B:K`` (batch sizes A..B), ``A:K`` (A only), ``A-:K`` (A and above),
e.g. ``1:4,2-:0``. The JSON form vLLM documents, ``[[1, 1, 4], [2, 64, 0]]``, is read too.
Ranges must start at 1 and follow each other without gaps or overlaps; batch sizes past the last
range use its K (as vLLM does). ``clipped(max_batch)`` cuts a schedule to the sizes an engine can
reach, so that ``max_k`` and ``str`` describe what can actually run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from padrec_vllm.model.config import MAX_DRAFT_TOKENS

OPEN = None  # the end of a range that runs to any batch size


@dataclass(frozen=True)
class SpecRange:
    """Batch sizes ``first``..``last`` (inclusive; ``last`` None = no end) decode with ``k``."""

    first: int
    last: int | None
    k: int

    def label(self) -> str:
        """``1``, ``2-32`` or ``33-`` (the ``batch_size`` label of ``padrec_spec_k``)."""
        if self.last == self.first:
            return str(self.first)
        return f"{self.first}-{'' if self.last is None else self.last}"


@dataclass(frozen=True)
class SpecSchedule:
    """Draft length K by batch size (module docstring). Build with ``parse``, ``fixed``,
    ``off``, ``of`` or the constructor (validated)."""

    ranges: tuple[SpecRange, ...]

    def __post_init__(self) -> None:
        if not self.ranges:
            raise ValueError("a draft-length schedule needs at least one range")
        expected = 1
        for i, r in enumerate(self.ranges):
            if expected is None:
                raise ValueError(f"range {r.label()}:{r.k} follows a range with no end")
            if r.first != expected:
                where = "must start at batch size 1" if i == 0 else f"must start at {expected}"
                raise ValueError(f"range {r.label()}:{r.k} {where} (no gaps, no overlaps)")
            if r.last is not None and r.last < r.first:
                raise ValueError(f"range {r.first}-{r.last} ends before it starts")
            if not 0 <= r.k <= MAX_DRAFT_TOKENS:
                raise ValueError(f"K={r.k} in range {r.label()} is not in 0..{MAX_DRAFT_TOKENS}")
            expected = None if r.last is None else r.last + 1

    # --- construction

    @classmethod
    def of(cls, ranges) -> SpecSchedule:
        """From ``(first, last, k)`` triples (``last`` None = no end), vLLM's list form."""
        triples = []
        for entry in ranges:
            if not isinstance(entry, list | tuple) or len(entry) != 3:
                raise ValueError(f"schedule entry {entry!r} is not (first, last, K)")
            first, last, k = entry
            if any(not isinstance(v, int) or isinstance(v, bool) for v in (first, k)) or not (
                last is None or (isinstance(last, int) and not isinstance(last, bool))
            ):
                raise ValueError(f"schedule entry {list(entry)!r} needs integers")
            triples.append(SpecRange(first, last, k))
        return cls(tuple(triples))

    @classmethod
    def fixed(cls, k: int) -> SpecSchedule:
        """K at every batch size."""
        return cls((SpecRange(1, OPEN, k),))

    @classmethod
    def off(cls) -> SpecSchedule:
        """Plain decoding at every batch size."""
        return cls.fixed(0)

    @classmethod
    def parse(cls, text: str) -> SpecSchedule:
        """``off``, ``K``, ``A-B:K,...`` or vLLM's JSON list; ValueError (one line) otherwise."""
        s = str(text).strip()
        if not s:
            raise ValueError("empty draft-length schedule; use off, K, or ranges like 1:4,2-:0")
        if s.lower() == "off":
            return cls.off()
        if s.startswith("["):
            try:
                data = json.loads(s)
            except json.JSONDecodeError as exc:
                raise ValueError(f"schedule {s!r} is not valid JSON: {exc.msg}") from None
            if not isinstance(data, list):
                raise ValueError(f"schedule {s!r} must be a list of [first, last, K]")
            return cls.of(data)
        if s.isdigit():
            return cls.fixed(int(s))
        return cls(tuple(_parse_range(part.strip(), s) for part in s.split(",")))

    # --- use

    def k_for(self, batch_size: int) -> int:
        """K for a batch of ``batch_size`` requests (past the last range: its K)."""
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        for r in self.ranges:
            if r.last is None or batch_size <= r.last:
                return r.k
        return self.ranges[-1].k

    @property
    def max_k(self) -> int:
        """The largest K of any range (0: plain decoding everywhere)."""
        return max(r.k for r in self.ranges)

    @property
    def uniform(self) -> bool:
        """One K at every batch size."""
        return len({r.k for r in self.ranges}) == 1

    def largest_batch_speculating(self, max_batch: int) -> int:
        """The largest batch size up to ``max_batch`` with K > 0; 0 when there is none."""
        best = 0
        for r in self.clipped(max_batch).ranges:
            if r.k > 0:
                best = max(best, max_batch if r.last is None else r.last)
        return best

    def clipped(self, max_batch: int) -> SpecSchedule:
        """The ranges an engine of at most ``max_batch`` requests reaches, the last one open,
        neighbours with the same K merged."""
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        out: list[SpecRange] = []
        for r in self.ranges:
            if r.first > max_batch:
                break
            last = r.last if r.last is not None and r.last < max_batch else max_batch
            if out and out[-1].k == r.k:
                out[-1] = SpecRange(out[-1].first, last, r.k)
            else:
                out.append(SpecRange(r.first, last, r.k))
        out[-1] = SpecRange(out[-1].first, OPEN, out[-1].k)
        return SpecSchedule(tuple(out))

    def to_vllm(self, max_batch: int) -> list[tuple[int, int, int]]:
        """``num_speculative_tokens_per_batch_size`` for vLLM up to ``max_batch``
        (``max_num_seqs``): closed ranges, the last one ending at ``max_batch``."""
        return [
            (r.first, max_batch if r.last is None else r.last, r.k)
            for r in self.clipped(max_batch).ranges
        ]

    def as_list(self) -> list[list[int | None]]:
        """``[[first, last, K], ...]``, ``last`` None for no end (JSON for ``/readyz``)."""
        return [[r.first, r.last, r.k] for r in self.ranges]

    def __str__(self) -> str:
        if len(self.ranges) == 1 and self.ranges[0].last is None:
            return "off" if self.max_k == 0 else str(self.max_k)
        return ",".join(f"{r.label()}:{r.k}" for r in self.ranges)


def _parse_range(part: str, whole: str) -> SpecRange:
    """``A-B:K``, ``A:K`` or ``A-:K``."""
    sizes, colon, k = part.partition(":")
    first, dash, last = sizes.partition("-")
    ok = colon and k.strip().isdigit() and first.strip().isdigit()
    ok = ok and (not dash or not last.strip() or last.strip().isdigit())
    if not ok:
        raise ValueError(
            f"schedule {whole!r}: {part!r} is not a range A-B:K, A:K or A-:K "
            "(e.g. 1:4,2-:0)"
        )
    end = int(first) if not dash else (int(last) if last.strip() else OPEN)
    return SpecRange(int(first), end, int(k))
