"""What an engine loads and how: one frozen config per engine over a shared base."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.model.config import HEAD_KINDS


@dataclass(frozen=True)
class EngineConfig:
    """Settings every engine reads. ``head`` None = plain greedy decoding (no speculation)."""

    artifacts: Path
    head: str | None = "padrec"
    num_draft_tokens: int | None = None  # K; None = the K the head was trained for
    max_batch_size: int = 32  # reference: rows per batch; vLLM: max_num_seqs
    dtype: str = "float32"  # float32 keeps speculative output identical to plain greedy
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.head is not None and self.head not in HEAD_KINDS:
            raise ValueError(f"unknown head {self.head!r}; choose from {', '.join(HEAD_KINDS)}")

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


@dataclass(frozen=True)
class ReferenceEngineConfig(EngineConfig):
    """The reference (plain PyTorch) engine's settings."""

    draft_int8: bool = False  # CPU, float32: an int8 copy of the head drafts
    spec_max_batch: int | None = None  # see ``speculation_row_limit``

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spec_max_batch is not None and self.spec_max_batch < 1:
            raise ValueError(f"spec_max_batch must be at least 1, got {self.spec_max_batch}")
        if self.draft_int8 and (self.device != "cpu" or self.dtype != "float32"):
            raise ValueError("draft_int8 needs device cpu and dtype float32")

    def speculation_row_limit(self) -> int | None:
        """Most rows a batch may have and still speculate; None = any number.

        A larger batch is decoded plainly (same tokens, no drafts). ``spec_max_batch`` when set;
        otherwise 1 on CPU, where plain decoding gets extra rows almost free while a verify of
        B rows x (K+1) tokens does not (docs/RESULTS.md, "Batch size and concurrency"), and no
        limit on other devices (not measured there).
        """
        if self.spec_max_batch is not None:
            return self.spec_max_batch
        return 1 if self.device == "cpu" else None


@dataclass(frozen=True)
class VllmEngineConfig(EngineConfig):
    """The vLLM engine's settings."""

    enforce_eager: bool = False
    kv_cache_bytes: int | None = None  # None: vLLM's default (VLLM_CPU_KVCACHE_SPACE on CPU)
    extra_args: dict = field(default_factory=dict)  # extra AsyncEngineArgs fields
