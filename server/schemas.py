"""Request and response bodies of the HTTP API (the OpenAPI schema is generated from these)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StringConstraints

MAX_LIST_LEN = 50  # most items one recommendation returns (k)
DEFAULT_K = 10  # k of a request that does not say (also the start-up calibration's)

UserId = Annotated[str, StringConstraints(max_length=256)] | StrictInt


class RecommendRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"history": [12, 7, 33], "k": 10}],
        },
    )

    history: list[StrictInt] = Field(description="item ids the user interacted with, oldest first")
    k: StrictInt = Field(DEFAULT_K, ge=1, le=MAX_LIST_LEN, description="number of items to return")
    user_id: UserId | None = Field(None, description="echoed back, for the caller's bookkeeping")
    exclude_history: StrictBool = Field(True, description="never recommend an item of the history")
    unknown_items: Literal["error", "ignore"] = Field(
        "error", description="history ids not in the catalog: 422 (error) or dropped (ignore)"
    )


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requests: list[RecommendRequest] = Field(min_length=1, description="answered in this order")


class Item(BaseModel):
    rank: int
    item_id: int
    sid: list[int] = Field(description="semantic-ID codes, one per level")
    title: str | None = None
    source: Literal["model", "popular"] = Field(
        description="model: from the generated list; popular: filled from the most-popular list"
    )


class HistoryInfo(BaseModel):
    received: int = Field(description="ids in the request")
    used: int = Field(description="items in the prompt (the newest, up to the limit)")
    truncated: bool = Field(description="older items were left out of the prompt")
    unknown_dropped: list[int] = Field(description="unknown ids dropped (unknown_items=ignore)")
    cold_start: bool = Field(description="no usable history: the most-popular answer")


class GenerationInfo(BaseModel):
    items: int = Field(description="items the model generated")
    invalid: int = Field(description="generated codes that name no item")
    duplicate: int = Field(description="repeats of an item already in the list")
    in_history: int = Field(description="history items dropped (exclude_history)")
    filled: int = Field(description="items taken from the most-popular list")
    finished: bool = Field(description="the model ended its list with <eos>")
    forced: int = Field(
        description="tokens the constraint forced (the only legal one) that the engine appended "
        "without a target forward choosing them; 0 without the constraint and where the engine "
        "verifies them (vLLM, plain reference batches)"
    )
    constrained: bool = Field(
        description="the list was decoded under the catalog constraint (false without it and "
        "for a cold start: no model call)"
    )


class Latency(BaseModel):
    total: float = Field(description="server time for this request, ms")
    queue: float = Field(description="waiting for the engine, ms")
    prefill: float = Field(description="prompt forward up to the first token, ms")
    decode: float = Field(description="the remaining tokens, ms")
    engine: float = Field(
        description="wall time awaiting the engine (queue + prefill + decode + "
        "hand-offs), ms; total - engine = time in the server"
    )


class SpecInfo(BaseModel):
    speculative: bool = Field(
        description="decoded with the draft head; false without a head, and where the draft-"
        "length schedule (PADREC_SPEC_SCHEDULE) gave the request K = 0"
    )
    num_draft_tokens: int = Field(
        0, description="K this request ran with (0: plain). Reference engine: its batch's K; "
        "vLLM: the schedule's K when it has one, else the most drafts any of its verify rounds "
        "proposed (docs/SERVER.md)"
    )
    draft_tokens: int = Field(description="drafts proposed")
    accepted_tokens: int = Field(description="drafts accepted by the target")
    tau: float = Field(description="tokens per target forward while decoding (1.0 without drafts)")
    target_forwards: int = Field(description="target forwards after prefill")
    acceptance_by_position: list[float] = Field(description="acceptance rate of draft 1..K")


class RecommendResponse(BaseModel):
    items: list[Item]
    k: int
    user_id: UserId | None = None
    model: str = Field(description="<dataset>/<preset> of the artifacts")
    engine: str
    head: str | None = Field(description="draft head in use; null without speculation")
    num_draft_tokens: int
    history: HistoryInfo
    generation: GenerationInfo
    latency_ms: Latency
    spec: SpecInfo
    notes: list[str] = Field(
        description="why the answer differs from the plain model list, if it does"
    )


class BatchResponse(BaseModel):
    responses: list[RecommendResponse]


class ErrorBody(BaseModel):
    error: str = Field(description="machine-readable code")
    message: str = Field(description="what is wrong, naming the field")
    detail: list[dict] | dict | None = None


class Health(BaseModel):
    status: str


class ScheduleInfo(BaseModel):
    setting: str = Field(description="PADREC_SPEC_SCHEDULE as read (auto, off, K or ranges)")
    schedule: str = Field(description="the schedule in use, e.g. 1:4,2-:0 (off: plain)")
    ranges: list[list[int | None]] = Field(
        description="[first, last, K] per batch-size range, last null = no end"
    )
    source: str = Field(
        description="setting (an explicit schedule), calibrated (auto: measured at this "
        "start), stored (auto: an earlier start's calibration with the same settings) or "
        "default (auto without calibration: the engine's default)"
    )


class Readiness(BaseModel):
    ready: bool
    status: str = Field(description="starting | ready | failed")
    engine: str
    model: str
    head: str | None
    num_draft_tokens: int
    fallback: str = Field(description="source of the most-popular list")
    constrained: bool = Field(
        description="lists are decoded under the catalog constraint (PADREC_CONSTRAINED)"
    )
    error: str | None = None
    calibration: dict | None = Field(
        None, description="start-up calibration: schedule, speedup where it drafts, tau, "
        "identical rate, requests/s by batch size and K"
    )
    spec_schedule: ScheduleInfo | None = Field(
        None, description="the draft-length schedule in use (null until the engine is ready)"
    )
