"""``ReferenceEngine``: ``padrec_vllm.decoding.generate`` behind the ``Engine`` interface.

A single worker task takes every pending request with the same budget as the oldest one (up to
``max_batch_size``) and decodes them as one batch in a worker thread; the batch's prefill and
decode times are split evenly among its rows (as ``decoding.generate`` reports them). A batch of
n rows decodes with K = ``schedule.k_for(n)`` drafts per round (``config.schedule()``, a
``SpecSchedule``), or without the head when that is 0 (its requests report
``speculative=False``); the tokens are the same either way. A batch keeps its K until its last row
is done: rows that finish early do not change it, requests that arrive meanwhile wait for the next
batch. Each result's ``accept_by_pos`` has the batch's K entries (0 when plain).
``set_schedule`` replaces the schedule (K up to the head's) from the next batch on; start-up
calibration (``engines.calibration``) uses it to measure each K.

Constrained requests (a ``ListSpec``) decode together, apart from free ones. Without the head
they skip forced tokens (``generate(..., skip_forced=True)``: same tokens, fewer forwards), so
plain decoding here is already the ``forced`` method and a calibrated speedup is the head's own
gain over it.

The head is loaded once and turned once into its decoding form (``model.decoding_head``: the CPU
fold, or its int8 copy with ``draft_int8``), which the engine keeps for its lifetime.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, replace

from padrec_vllm.catalog.catalog import LAYOUT_FILE, Catalog
from padrec_vllm.catalog.constraint import CatalogTrie, ListConstraint, ListSpec
from padrec_vllm.catalog.tokens import EOS_ID, SlotRule, TokenLayout
from padrec_vllm.decoding.accounting import RequestResult
from padrec_vllm.engines.api import EngineError
from padrec_vllm.engines.config import ReferenceEngineConfig
from padrec_vllm.engines.schedule import SpecSchedule


@dataclass
class _Pending:
    prompt: list[int]
    max_new_tokens: int
    spec: ListSpec | None
    future: asyncio.Future
    enqueued: float

    def key(self) -> tuple[int, bool]:
        """Requests decode together when their budget and constrained-ness agree."""
        return self.max_new_tokens, self.spec is None


class ReferenceEngine:
    """Plain-PyTorch engine (float32 by default, one worker thread); module docstring."""

    name = "reference"

    def __init__(self, config: ReferenceEngineConfig):
        self.config = config
        self._target = None
        self._head = None  # the decoding form of the head (``model.decoding_head``)
        self._slots: SlotRule | None = None
        self._trie: CatalogTrie | None = None  # the catalog's, for constrained requests
        self._num_drafts = 0
        self._max_drafts = 0  # the most K ``set_schedule`` takes (the head's; 0 without it)
        self._pending: deque[_Pending] = deque()
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._schedule = SpecSchedule.off()  # set by ``_load`` (reads the head's K)

    @property
    def num_draft_tokens(self) -> int:
        return self._num_drafts

    @property
    def schedule(self) -> SpecSchedule:
        return self._schedule

    @property
    def max_model_len(self) -> int:
        return int(self._target.config.max_position_embeddings)

    @property
    def max_draft_tokens(self) -> int:
        return self._max_drafts

    async def start(
        self,
        warmup_prompts: list[list[int]],
        max_new_tokens: int,
        constraint: ListSpec | None = None,
    ) -> None:
        await asyncio.to_thread(self._load)
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="padrec-reference-engine")
        if not warmup_prompts:
            return
        # warm-up: the largest batch that speculates, at its K, then plain
        rows = self._schedule.largest_batch_speculating(self.config.max_batch_size)
        k = self._schedule.k_for(rows) if rows else 0
        specs = None if constraint is None else [constraint] * len(warmup_prompts)
        for drafts in sorted({k, 0}, reverse=True):
            await asyncio.to_thread(
                self._decode, warmup_prompts, max_new_tokens, drafts, rows or None, specs
            )

    async def set_schedule(self, schedule: SpecSchedule) -> None:
        if schedule.max_k > self._max_drafts:
            raise EngineError(
                f"schedule {schedule} drafts {schedule.max_k} tokens; the engine's head allows "
                f"{self._max_drafts}"
            )
        self._schedule = schedule.clipped(self.config.max_batch_size)
        self._num_drafts = self._schedule.max_k

    def _load(self) -> None:
        from padrec_vllm.model.decoding_head import decoding_head
        from padrec_vllm.model.head_checkpoint import load_head
        from padrec_vllm.model.target import load_target

        c = self.config
        try:
            import torch

            dtype = getattr(torch, c.dtype)
            self._target = load_target(c.paths.target, dtype=dtype, device=c.device)
            self._slots = TokenLayout.load(c.paths.root / LAYOUT_FILE).slot_rule()
            self._trie = CatalogTrie.from_catalog(Catalog.load(c.paths.root))
            self._schedule = c.schedule()
            if self._schedule.max_k > 0:
                head = load_head(c.head_dir, device=c.device, dtype=dtype)
                self._head = decoding_head(head, self._target, int8=c.draft_int8)
                self._num_drafts = self._schedule.max_k
                self._max_drafts = c.draft_tokens()
        except Exception as exc:  # any load failure means "not running"
            raise EngineError(f"reference engine failed to load {c.artifacts}: {exc}") from exc

    def _decode(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        drafts: int,
        rows: int | None = None,
        specs: list[ListSpec] | None = None,
    ) -> list[RequestResult]:
        """Greedy completions of ``prompts`` in batches of ``rows`` (default ``max_batch_size``)
        with ``drafts`` (K) per round, 0 = plain; each under its ``specs[i]`` when given (all
        constrained or none)."""
        from padrec_vllm.decoding import generate

        constraints: list[ListConstraint] | None = None
        if specs is not None:
            constraints = [s.start(self._trie) for s in specs]
        head = self._head if drafts > 0 else None
        return generate(
            self._target,
            prompts,
            max_new_tokens=max_new_tokens,
            eos_id=EOS_ID,
            batch_size=rows or self.config.max_batch_size,
            head=head,
            num_draft_tokens=drafts if head is not None else None,
            slot_of_token=self._slots,
            constraints=constraints,
            skip_forced=constraints is not None and head is None,
        )

    async def generate(
        self, prompt: list[int], max_new_tokens: int, constraint: ListSpec | None = None
    ) -> RequestResult:
        if self._worker is None or self._worker.done():
            raise EngineError("reference engine is not running")
        future = asyncio.get_running_loop().create_future()
        pending = _Pending(prompt, max_new_tokens, constraint, future, time.perf_counter())
        self._pending.append(pending)
        self._wakeup.set()
        return await future

    async def _run(self) -> None:
        while True:
            if not self._pending:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            key = self._pending[0].key()
            batch = [p for p in self._pending if p.key() == key][: self.config.max_batch_size]
            for p in batch:
                self._pending.remove(p)
            batch = [p for p in batch if not p.future.cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            drafts = self._schedule.k_for(len(batch)) if self._head is not None else 0
            try:
                prompts = [p.prompt for p in batch]
                specs = None if key[1] else [p.spec for p in batch]
                results = await asyncio.to_thread(
                    self._decode, prompts, key[0], drafts, None, specs
                )
            except Exception as exc:  # noqa: BLE001 - handed to every waiting request
                for p in batch:
                    if not p.future.done():
                        p.future.set_exception(EngineError(f"reference engine failed: {exc}"))
                continue
            for p, r in zip(batch, results):
                if not p.future.done():
                    p.future.set_result(replace(r, queue_s=started - p.enqueued))

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
