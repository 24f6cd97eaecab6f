"""The engine interface the server talks to.

An engine turns prompts (token-id lists) into greedy completions with the per-request figures of
``padrec_vllm.decoding.RequestResult``, free or under a per-request list constraint
(``catalog.constraint.ListSpec``: k items, excluded ids; the engine holds the catalog's trie). It
knows nothing about HTTP or how items are ranked and shown.
Implementations: ``padrec_vllm.engines.reference.ReferenceEngine`` (plain PyTorch) and
``padrec_vllm.vllm_plugin.async_engine.VllmEngine`` (vLLM; import it only where vLLM is installed).

Lifecycle: ``await start(warmup_prompts, max_new_tokens, constraint)`` loads the model and warms
it up on the prompts. Then ``generate`` any number of times, concurrently; ``close`` at the end.
Engine failures raise ``EngineError``.

Speculation follows the engine's draft-length schedule (``schedule``: K by batch size, 0 =
plain); each ``RequestResult`` says the K its request ran with (``RequestResult.num_draft_tokens``,
see each engine for how exact that is). ``set_schedule`` changes it on a running engine (K up to
``max_draft_tokens``); requests in flight keep their tokens, since every K gives the same ones.
Start-up calibration (``engines.calibration``) measures each K through it and picks the schedule.
"""

from __future__ import annotations

from typing import Protocol

from padrec_vllm.catalog.constraint import ListSpec
from padrec_vllm.decoding.accounting import RequestResult
from padrec_vllm.engines.config import EngineConfig
from padrec_vllm.engines.schedule import SpecSchedule


class EngineError(RuntimeError):
    """The engine failed or is not running (the server answers 503)."""


class Engine(Protocol):
    name: str  # "reference" | "vllm"
    config: EngineConfig

    @property
    def num_draft_tokens(self) -> int:
        """The largest K in use (the schedule's ``max_k``); 0 without speculation."""

    @property
    def schedule(self) -> SpecSchedule:
        """The draft-length schedule in use (``engines.schedule``), clipped to the engine's batch;
        valid once started (``off`` before, and without a head)."""

    @property
    def max_model_len(self) -> int:
        """Longest prompt + completion the engine accepts, in tokens."""

    @property
    def max_draft_tokens(self) -> int:
        """The largest K ``set_schedule`` accepts: the loaded head's; 0 without a head."""

    async def start(
        self,
        warmup_prompts: list[list[int]],
        max_new_tokens: int,
        constraint: ListSpec | None = None,
    ) -> None:
        """Load, then warm up on ``warmup_prompts`` (under ``constraint`` when given)."""

    async def set_schedule(self, schedule: SpecSchedule) -> None:
        """Decode by ``schedule`` from now on (clipped to the engine's batch); EngineError when
        it drafts more than ``max_draft_tokens``."""

    async def generate(
        self, prompt: list[int], max_new_tokens: int, constraint: ListSpec | None = None
    ) -> RequestResult:
        """Greedy completion of one prompt, stopping at ``<eos>`` (kept) or the budget. With
        ``constraint`` the completion is a legal list (``catalog.constraint``): plain constrained
        greedy's tokens exactly, with or without speculation; forced tokens are counted in
        ``RequestResult.forced_tokens``."""

    async def close(self) -> None: ...

    def alive(self) -> bool:
        """False once the engine has died (after a successful start)."""

    def prometheus_text(self) -> bytes:
        """The engine's own Prometheus series (exposition format), b"" when it has none."""
