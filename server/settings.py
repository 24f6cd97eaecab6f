"""Server settings: environment variables ``PADREC_*`` (pydantic-settings), overridable in code.

Every field is read from ``PADREC_<FIELD>`` (case-insensitive), e.g. ``PADREC_ARTIFACTS``,
``PADREC_ENGINE=reference``, ``PADREC_SPECULATIVE=false``. docs/SERVER.md lists them all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from padrec_vllm.engines.schedule import SpecSchedule
from padrec_vllm.model.config import HEAD_KINDS, MAX_DRAFT_TOKENS

MIB = 1 << 20
AUTO = "auto"  # PADREC_SPEC_SCHEDULE: start-up calibration picks K per batch size


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PADREC_", extra="ignore")

    artifacts: Path = Field(description="artifacts directory of `padrec build`")
    engine: Literal["vllm", "reference"] = Field("vllm", description="decoding engine")
    speculative: bool = Field(True, description="speculative decoding with the draft head")
    head: Literal[HEAD_KINDS] = Field(
        "padrec", description="draft head under <artifacts>/heads/"
    )
    num_draft_tokens: int | None = Field(
        None, ge=1, le=MAX_DRAFT_TOKENS, description="K; default: what the head was trained for"
    )
    max_in_flight: int = Field(64, ge=1, description="recommendations in flight before 503")
    max_batch_requests: int = Field(64, ge=1, description="requests per /recommend/batch call")
    max_history: int | None = Field(
        None, ge=1, description="history items in the prompt; default: the preset's H"
    )
    constrained: bool = Field(
        True, description="decode every list under the catalog constraint (k distinct catalog "
        "items, none from the history); off: free decoding, then repair and popularity fill"
    )
    extra_items: int = Field(
        5, ge=0, description="without the constraint: items generated beyond k (room for "
        "filtering); unused under the constraint"
    )
    max_body_bytes: int = Field(MIB, ge=1024, description="larger request bodies get 413")
    drain_body_bytes: int = Field(
        64 * MIB, ge=0, description="a body over max_body_bytes is read and discarded up to this "
        "size before its 413 (clients that send the whole body first then see the answer)"
    )
    retry_after_s: int = Field(1, ge=1, description="Retry-After of a 503")
    calibration_requests: int = Field(
        16, ge=0, description="prompts per start-up calibration point (each batch size and K; "
        "at least 2 per client); 0: no calibration, auto then means the engine's default"
    )
    calibration_max_batch: int | None = Field(
        None, ge=1, description="largest batch size calibrated (1, 2, 4, ... up to it); "
        "default: max_batch_size"
    )
    recalibrate: bool = Field(
        False, description="measure at start-up even when a stored calibration matches"
    )
    calibration_dir: Path | None = Field(
        None, description="where calibrations are stored; default <artifacts>/calibration"
    )
    data_dir: Path | None = Field(None, description="datasets folder, for the popularity fallback")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch_size: int = Field(32, ge=1, description="engine batch (vLLM: max_num_seqs)")
    device: str = Field("cpu", description="reference engine device (cpu, cuda, cuda:N)")
    draft_int8: bool = Field(
        False, description="reference engine on CPU, float32: draft with an int8 copy of the head "
        "(faster draft steps; the target verifies in float32, so lists are unchanged)"
    )
    spec_schedule: str = Field(
        "auto", description="draft length K by batch size, both engines: auto, off, K, or "
        "ranges A-B:K (K=0: plain), e.g. 1:4,2-:0. auto: the fastest K per batch size, "
        "measured at start-up (or stored from an earlier start with the same settings)"
    )
    spec_max_batch: int | None = Field(
        None, description="removed: refused with a pointer to PADREC_SPEC_SCHEDULE", exclude=True
    )
    vllm_enforce_eager: bool = False
    vllm_kv_cache_gib: float | None = Field(None, gt=0, description="vLLM KV cache size")
    vllm_args: dict = Field(default_factory=dict, description="extra vLLM AsyncEngineArgs (JSON)")
    log_level: str = "info"

    @model_validator(mode="after")
    def _int8_drafting_is_reference_cpu(self) -> Settings:
        reference_cpu = (self.engine, self.device, self.dtype) == ("reference", "cpu", "float32")
        if self.draft_int8 and not reference_cpu:
            raise ValueError("draft_int8 needs engine=reference, device=cpu and dtype=float32")
        return self

    @field_validator("spec_schedule")
    @classmethod
    def _schedule_parses(cls, value: str) -> str:
        """``auto``, or a schedule ``SpecSchedule.parse`` reads (kept in its canonical form)."""
        if value.strip().lower() == AUTO:
            return AUTO
        return str(SpecSchedule.parse(value))

    @model_validator(mode="after")
    def _spec_max_batch_was_replaced(self) -> Settings:
        if self.spec_max_batch is not None:
            n = self.spec_max_batch
            raise ValueError(
                "PADREC_SPEC_MAX_BATCH was replaced by PADREC_SPEC_SCHEDULE (both engines): for "
                f"'speculate on batches of up to {n} rows' set PADREC_SPEC_SCHEDULE="
                f"1-{n}:K,{n + 1}-:0 with K the draft length (docs/SERVER.md)"
            )
        return self

    @model_validator(mode="after")
    def _one_source_for_k(self) -> Settings:
        if self.spec_schedule == AUTO:
            return self
        if self.num_draft_tokens is not None:
            raise ValueError(
                "PADREC_NUM_DRAFT_TOKENS sets K of spec_schedule=auto only; with "
                f"spec_schedule={self.spec_schedule} put K in the schedule"
            )
        if not self.speculative and self.schedule().max_k > 0:
            raise ValueError(
                f"spec_schedule={self.spec_schedule} drafts, but speculative=false loads no head"
            )
        return self

    def calibration_folder(self) -> Path:
        return self.calibration_dir or Path(self.artifacts) / "calibration"

    def schedule(self) -> SpecSchedule | None:
        """The explicit draft-length schedule; None for ``auto`` (the engine's default)."""
        return None if self.spec_schedule == AUTO else SpecSchedule.parse(self.spec_schedule)
