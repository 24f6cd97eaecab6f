"""What an engine loads and how: one frozen config per engine over a shared base."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.engines.schedule import SpecRange, SpecSchedule
from padrec_vllm.model.config import HEAD_KINDS


@dataclass(frozen=True)
class EngineConfig:
    """Settings every engine reads. ``head`` None = plain greedy decoding (no speculation).

    ``spec_schedule``: K by batch size (``schedule.SpecSchedule``); None = the engine's default
    (``default_schedule``), built from ``num_draft_tokens``. ``schedule()`` is the one in use.
    """

    artifacts: Path
    head: str | None = "padrec"
    num_draft_tokens: int | None = None  # K of the default schedule; None = the head's trained K
    max_batch_size: int = 32  # reference: rows per batch; vLLM: max_num_seqs
    dtype: str = "float32"  # float32 keeps speculative output identical to plain greedy
    device: str = "cpu"
    spec_schedule: SpecSchedule | None = None

    def __post_init__(self) -> None:
        if self.head is not None and self.head not in HEAD_KINDS:
            raise ValueError(f"unknown head {self.head!r}; choose from {', '.join(HEAD_KINDS)}")
        if self.spec_schedule is not None and not isinstance(self.spec_schedule, SpecSchedule):
            raise ValueError(f"spec_schedule must be a SpecSchedule, got {self.spec_schedule!r}")

    @property
    def paths(self) -> ArtifactPaths:
        return ArtifactPaths(Path(self.artifacts))

    @property
    def head_dir(self) -> Path | None:
        return self.paths.head(self.head) if self.head else None

    def draft_tokens(self) -> int:
        """K in use: the setting, else the head checkpoint's ``padrec_num_steps``; 0 if no head."""
        if self.head is None:
            return 0
        if self.num_draft_tokens is not None:
            return self.num_draft_tokens
        return int(self.paths.head_config(self.head)["padrec_num_steps"])

    def default_schedule(self, k: int) -> SpecSchedule:
        """The schedule without a ``spec_schedule`` (``auto`` until start-up calibration
        chooses one): ``k`` at every batch size, as before schedules existed."""
        return SpecSchedule.fixed(k)

    def schedule(self) -> SpecSchedule:
        """The schedule in use, clipped to ``max_batch_size``: ``spec_schedule``, else
        ``default_schedule(draft_tokens())``; plain decoding everywhere without a head."""
        if self.head is None:
            return SpecSchedule.off().clipped(self.max_batch_size)
        chosen = self.spec_schedule or self.default_schedule(self.draft_tokens())
        return chosen.clipped(self.max_batch_size)


@dataclass(frozen=True)
class ReferenceEngineConfig(EngineConfig):
    """The reference (plain PyTorch) engine's settings."""

    draft_int8: bool = False  # CPU, float32: an int8 copy of the head drafts

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.draft_int8 and (self.device != "cpu" or self.dtype != "float32"):
            raise ValueError("draft_int8 needs device cpu and dtype float32")

    def default_schedule(self, k: int) -> SpecSchedule:
        """On CPU ``1:k,2-:0``: speculate on one-row batches only, where plain decoding gets
        extra rows almost free while a verify of B rows x (K+1) tokens does not (docs/RESULTS.md,
        "Batch size and concurrency"); elsewhere ``k`` at every batch size (not measured)."""
        if self.device != "cpu":
            return SpecSchedule.fixed(k)
        return SpecSchedule((SpecRange(1, 1, k), SpecRange(2, None, 0)))


@dataclass(frozen=True)
class VllmEngineConfig(EngineConfig):
    """The vLLM engine's settings."""

    enforce_eager: bool = False
    kv_cache_bytes: int | None = None  # None: vLLM's default (VLLM_CPU_KVCACHE_SPACE on CPU)
    extra_args: dict = field(default_factory=dict)  # extra AsyncEngineArgs fields
