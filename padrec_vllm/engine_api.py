"""The engine interface the server talks to, and its reference (plain PyTorch) implementation.

An engine turns prompts (token-id lists) into greedy completions with the per-request figures
of DESIGN.md section 5. It knows nothing about items, catalogs or HTTP. Implementations:

- ``ReferenceEngine`` (below): ``padrec_vllm.decoding.generate`` in one worker thread; requests
  that arrive while a batch runs are batched together (up to ``max_batch_size``).
- ``padrec_vllm.vllm_plugin.async_engine.VllmEngine``: vLLM's ``AsyncLLM`` in-process, the head
  as vLLM's EAGLE speculative decoder. Import it only where vLLM is installed.

Lifecycle: ``await start(warmup_prompts, max_new_tokens, calibrate)`` loads the model, warms it
up on the prompts and, when speculating and asked to, *calibrates*: decodes the same prompts
without speculation and with it, same engine code, same machine, one after the other, and returns
the wall-clock ratio (``Calibration``). Then ``generate`` any number of times, concurrently;
``close`` at the end. Engine failures raise ``EngineError``.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import deque
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.catalog.tokens import EOS_ID, TokenLayout

HEADS = ("padrec", "eagle")


class EngineError(RuntimeError):
    """The engine failed or is not running (the server answers 503)."""


@dataclass(frozen=True)
class EngineConfig:
    """What to load and how. ``head`` None = plain greedy decoding (no speculation)."""

    artifacts: Path
    head: str | None = "padrec"
    num_draft_tokens: int | None = None  # K; None = the K the head was trained for
    max_batch_size: int = 32  # reference: rows per batch; vLLM: max_num_seqs
    dtype: str = "float32"  # float32 keeps speculative output identical to plain greedy
    device: str = "cpu"  # reference engine only
    vllm_enforce_eager: bool = False
    vllm_kv_cache_bytes: int | None = None  # None: vLLM's default (VLLM_CPU_KVCACHE_SPACE on CPU)
    vllm_args: dict = field(default_factory=dict)  # extra AsyncEngineArgs fields
    draft_int8: bool = False  # reference engine, CPU, float32: int8 copy of the head drafts
    spec_max_batch: int | None = None  # reference engine; see ``speculation_row_limit``

    def __post_init__(self) -> None:
        if self.spec_max_batch is not None and self.spec_max_batch < 1:
            raise ValueError(f"spec_max_batch must be at least 1, got {self.spec_max_batch}")
        if self.head is not None and self.head not in HEADS:
            raise ValueError(f"unknown head {self.head!r}; choose from {', '.join(HEADS)}")
        if self.draft_int8 and (self.device != "cpu" or self.dtype != "float32"):
            raise ValueError("draft_int8 needs device cpu and dtype float32")

    @property
    def paths(self) -> ArtifactPaths:
        return ArtifactPaths(Path(self.artifacts))

    @property
    def head_dir(self) -> Path | None:
        return self.paths.head(self.head) if self.head else None

    def speculation_row_limit(self) -> int | None:
        """Most rows a reference-engine batch may have and still speculate; None = any number.

        A larger batch is decoded plainly (same tokens, no drafts). ``spec_max_batch`` when set;
        otherwise 1 on CPU, where plain decoding gets extra rows almost free while a verify of
        B rows x (K+1) tokens does not (docs/RESULTS.md, "Batch size": bench preset 1.20x at one
        row, 0.92x at 2, 0.80x at 8; demo preset 1.35x, 1.10x, 0.89x at 4), and no limit on other
        devices (not measured there).
        """
        if self.spec_max_batch is not None:
            return self.spec_max_batch
        return 1 if self.device == "cpu" else None

    def draft_tokens(self) -> int:
        """K in use: the setting, else the head checkpoint's ``padrec_num_steps``; 0 if no head."""
        if self.head is None:
            return 0
        if self.num_draft_tokens is not None:
            return self.num_draft_tokens
        return int(json.loads((self.head_dir / "config.json").read_text())["padrec_num_steps"])


@dataclass(frozen=True)
class Generation:
    """One request's completion and figures (definitions: ``padrec_vllm.decoding.results``).

    ``acceptance_histogram[a]`` = verify rounds that accepted ``a`` drafts (length K+1; empty
    without speculation). ``accept_by_pos[j]`` = (accepted, proposed) for draft position j+1.
    ``queue_s`` = waiting before the engine took the request; ``prefill_s`` = until the first
    token; ``decode_s`` = the rest.
    """

    tokens: list[int]
    queue_s: float
    prefill_s: float
    decode_s: float
    target_forwards: int
    accept_by_pos: tuple[tuple[int, int], ...] = ()
    accept_by_slot: dict[int, tuple[int, int]] = field(default_factory=dict)
    acceptance_histogram: tuple[int, ...] = ()

    @property
    def speculative(self) -> bool:
        """Decoded with the draft head: both engines report K draft positions then, none without."""
        return bool(self.accept_by_pos)

    @property
    def draft_tokens(self) -> int:
        return sum(p for _, p in self.accept_by_pos)

    @property
    def accepted_tokens(self) -> int:
        return sum(a for a, _ in self.accept_by_pos)

    @property
    def decode_tokens(self) -> int:
        """Tokens emitted after the first (the first comes from prefill)."""
        return max(len(self.tokens) - 1, 0)

    @property
    def tau(self) -> float:
        return self.decode_tokens / self.target_forwards if self.target_forwards else 0.0


@dataclass(frozen=True)
class Calibration:
    """Same prompts decoded without and with speculation, one after the other, same engine."""

    requests: int
    plain_s: float  # wall clock of the whole plain run
    speculative_s: float  # wall clock of the whole speculative run
    plain_s_per_token: float  # mean over requests of decode_s / decode tokens
    speculative_s_per_token: float
    identical_rate: float  # requests whose tokens are identical in both runs
    tau: float
    batch_rows: int  # most requests decoded together in either run

    @property
    def speedup(self) -> float:
        return self.plain_s / self.speculative_s if self.speculative_s > 0 else 0.0


def calibration_of(
    plain: list[Generation],
    spec: list[Generation],
    plain_s: float,
    spec_s: float,
    batch_rows: int,
) -> Calibration:
    def per_token(gens: list[Generation]) -> float:
        rates = [g.decode_s / g.decode_tokens for g in gens if g.decode_tokens]
        return sum(rates) / len(rates) if rates else 0.0

    forwards = sum(g.target_forwards for g in spec)
    return Calibration(
        requests=len(plain),
        plain_s=plain_s,
        speculative_s=spec_s,
        plain_s_per_token=per_token(plain),
        speculative_s_per_token=per_token(spec),
        identical_rate=sum(a.tokens == b.tokens for a, b in zip(plain, spec)) / max(len(plain), 1),
        tau=sum(g.decode_tokens for g in spec) / forwards if forwards else 0.0,
        batch_rows=batch_rows,
    )


def generation_from_rounds(
    tokens: list[int],
    accepted: list[int],
    drafted: list[int],
    num_drafts: int,
    slot_of_token: list[int] | None,
    *,
    queue_s: float,
    prefill_s: float,
    decode_s: float,
) -> Generation:
    """Figures of a request from its per-round counts (what vLLM reports per request).

    ``accepted[r]`` / ``drafted[r]``: drafts accepted / proposed in verify round r. The first
    token comes from prefill; round r then emits ``accepted[r] + 1`` tokens. A draft's slot is
    that of the emitted token at its position: exact for accepted drafts; for the first rejected
    draft (whose id vLLM does not report) it is the slot of the target's token there, which is the
    same whenever the draft keeps the item structure. Later drafts of the round are not judged
    and not counted (as in the reference engine).
    """
    by_pos = [[0, 0] for _ in range(num_drafts)]
    by_slot: dict[int, list[int]] = {}
    hist = [0] * (num_drafts + 1)
    pos = 1  # index in ``tokens`` of the first token the round proposes
    for a, d in zip(accepted, drafted):
        hist[min(a, num_drafts)] += 1
        for j in range(min(d, num_drafts)):
            by_pos[j][1] += 1
            by_pos[j][0] += j < a
        if slot_of_token is not None:
            for j in range(min(a + 1, d)):
                if pos + j < len(tokens):
                    acc_prop = by_slot.setdefault(slot_of_token[tokens[pos + j]], [0, 0])
                    acc_prop[0] += j < a
                    acc_prop[1] += 1
        pos += a + 1
    return Generation(
        tokens=list(tokens),
        queue_s=queue_s,
        prefill_s=prefill_s,
        decode_s=decode_s,
        target_forwards=len(accepted),
        accept_by_pos=tuple((a, p) for a, p in by_pos),
        accept_by_slot={s: (a, p) for s, (a, p) in sorted(by_slot.items())},
        acceptance_histogram=tuple(hist) if num_drafts else (),
    )


def load_slot_table(artifacts: Path) -> list[int]:
    """``slot_of_token`` of the artifacts' token layout."""
    return TokenLayout.load(ArtifactPaths(Path(artifacts)).root / "token_layout.json").slot_table()


class Engine(Protocol):
    name: str  # "reference" | "vllm"
    config: EngineConfig

    @property
    def num_draft_tokens(self) -> int:
        """K in use; 0 without speculation."""

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion the engine accepts, in tokens."""

    async def start(
        self, warmup_prompts: list[list[int]], max_new_tokens: int, calibrate: bool = True
    ) -> Calibration | None:
        """Load, warm up on ``warmup_prompts``; with ``calibrate`` and a head, calibrate on them."""

    async def generate(self, prompt: list[int], max_new_tokens: int) -> Generation:
        """Greedy completion of one prompt, stopping at ``<eos>`` (kept) or the budget."""

    async def close(self) -> None: ...

    def alive(self) -> bool:
        """False once the engine has died (after a successful start)."""

    def prometheus_text(self) -> bytes:
        """The engine's own Prometheus series (exposition format), b"" when it has none."""


@dataclass
class _Pending:
    prompt: list[int]
    max_new_tokens: int
    future: asyncio.Future
    enqueued: float


class ReferenceEngine:
    """``padrec_vllm.decoding.generate`` behind the ``Engine`` interface (float32, one thread).

    A single worker task takes every pending request with the same budget as the oldest one (up
    to ``max_batch_size``) and decodes them as one batch in a worker thread; the batch's prefill
    and decode times are split evenly among its rows (as ``decoding.generate`` reports them).
    A batch of more rows than ``config.speculation_row_limit()`` is decoded without the head
    (its requests report ``speculative=False``); the tokens are the same either way.
    Calibration decodes its prompts in batches of that many rows, plain and speculative alike,
    so the figure is what a speculated request gains.
    """

    name = "reference"

    def __init__(self, config: EngineConfig):
        self.config = config
        self._target = None
        self._head = None
        self._slots: list[int] | None = None
        self._k = 0
        self._pending: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        limit = config.speculation_row_limit()
        # rows of a batch that still speculates; calibration decodes in batches of this size
        self._spec_rows = min(limit or config.max_batch_size, config.max_batch_size)

    @property
    def num_draft_tokens(self) -> int:
        return self._k

    @property
    def max_model_len(self) -> int:
        return int(self._target.config.max_position_embeddings)

    async def start(
        self, warmup_prompts: list[list[int]], max_new_tokens: int, calibrate: bool = True
    ) -> Calibration | None:
        await asyncio.to_thread(self._load)
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="padrec-reference-engine")
        if not warmup_prompts:
            return None
        rows = self._spec_rows
        await asyncio.to_thread(self._decode, warmup_prompts[:2], max_new_tokens, self._head, rows)
        if self._head is None or not calibrate:
            return None
        t0 = time.perf_counter()
        plain = await asyncio.to_thread(self._decode, warmup_prompts, max_new_tokens, None, rows)
        t1 = time.perf_counter()
        spec = await asyncio.to_thread(
            self._decode, warmup_prompts, max_new_tokens, self._head, rows
        )
        t2 = time.perf_counter()
        return calibration_of(plain, spec, t1 - t0, t2 - t1, min(rows, len(warmup_prompts)))

    def _load(self) -> None:
        from padrec_vllm.model.head_checkpoint import load_head
        from padrec_vllm.model.target import load_target

        try:
            import torch

            dtype = getattr(torch, self.config.dtype)
            self._target = load_target(
                self.config.paths.target, dtype=dtype, device=self.config.device
            )
            self._slots = load_slot_table(self.config.artifacts)
            if self.config.head is not None:
                self._head = load_head(self.config.head_dir, device=self.config.device, dtype=dtype)
                if self.config.draft_int8:
                    from padrec_vllm.model.int8_linear import quantize_head

                    self._head = quantize_head(self._head, self._target)
                self._k = self.config.draft_tokens()
        except Exception as exc:  # any load failure means "not running"
            raise EngineError(
                f"reference engine failed to load {self.config.artifacts}: {exc}"
            ) from exc

    def _decode(
        self, prompts: list[list[int]], max_new_tokens: int, head, rows: int | None = None
    ) -> list[Generation]:
        """Greedy completions of ``prompts`` in batches of ``rows`` (default ``max_batch_size``)."""
        from padrec_vllm.decoding import generate

        results = generate(
            self._target,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=EOS_ID,
            batch_size=rows or self.config.max_batch_size,
            head=head,
            num_draft_tokens=self._k if head is not None else None,
            slot_of_token=self._slots,
        )
        k = self._k if head is not None else 0
        return [_generation_of(r, k) for r in results]

    async def generate(self, prompt: list[int], max_new_tokens: int) -> Generation:
        if self._worker is None or self._worker.done():
            raise EngineError("reference engine is not running")
        future = asyncio.get_running_loop().create_future()
        self._pending.append(_Pending(prompt, max_new_tokens, future, time.perf_counter()))
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            budget = self._pending[0].max_new_tokens
            batch = [p for p in self._pending if p.max_new_tokens == budget][
                : self.config.max_batch_size
            ]
            for p in batch:
                self._pending.remove(p)
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            head = self._head if len(batch) <= self._spec_rows else None
            try:
                prompts = [p.prompt for p in batch]
                gens = await asyncio.to_thread(self._decode, prompts, budget, head)
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(EngineError(f"reference engine failed: {exc}"))
                continue
            for p, g in zip(batch, gens):
                if not p.future.done():
                    p.future.set_result(replace(g, queue_s=started - p.enqueued))

    async def close(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            try:
                await self._worker
            except asyncio.CancelledError:
                pass
            self._worker = None
        while self._pending:
            p = self._pending.popleft()
            if not p.future.done():
                p.future.set_exception(EngineError("engine closed"))

    def alive(self) -> bool:
        return self._worker is not None and not self._worker.done()

    def prometheus_text(self) -> bytes:
        return b""


def _generation_of(result, num_drafts: int) -> Generation:
    """``decoding.RequestResult`` -> ``Generation``; the histogram follows from accept_by_pos."""
    hist: tuple[int, ...] = ()
    if num_drafts and result.accept_by_pos:
        rounds = result.accept_by_pos[0][1]
        at_least = [rounds] + [a for a, _ in result.accept_by_pos] + [0]  # rounds accepting >= j
        hist = tuple(at_least[j] - at_least[j + 1] for j in range(num_drafts + 1))
    return Generation(
        tokens=list(result.tokens),
        queue_s=0.0,
        prefill_s=result.prefill_s,
        decode_s=result.draft_s + result.verify_s,
        target_forwards=result.target_forwards,
        accept_by_pos=tuple(tuple(x) for x in result.accept_by_pos),
        accept_by_slot=dict(result.accept_by_slot),
        acceptance_histogram=hist,
    )
