"""Settings -> engine. The vLLM adapter is imported only when asked for (vLLM is optional)."""

from __future__ import annotations

from padrec_vllm.engines import (
    Engine,
    EngineConfig,
    ReferenceEngine,
    ReferenceEngineConfig,
    VllmEngineConfig,
)
from server.settings import Settings


def engine_config(settings: Settings) -> EngineConfig:
    """The config of ``settings.engine`` (``ReferenceEngineConfig`` or ``VllmEngineConfig``)."""
    schedule = settings.schedule()  # None: auto, the engine's default
    speculative = settings.speculative and (schedule is None or schedule.max_k > 0)
    common = {
        "artifacts": settings.artifacts,
        "head": settings.head if speculative else None,
        "num_draft_tokens": settings.num_draft_tokens,
        "max_batch_size": settings.max_batch_size,
        "dtype": settings.dtype,
        "device": settings.device,
        "spec_schedule": schedule if speculative else None,
    }
    if settings.engine == "reference":
        return ReferenceEngineConfig(**common, draft_int8=settings.draft_int8)
    kv = settings.vllm_kv_cache_gib
    return VllmEngineConfig(
        **common,
        enforce_eager=settings.vllm_enforce_eager,
        kv_cache_bytes=int(kv * (1 << 30)) if kv is not None else None,
        extra_args=dict(settings.vllm_args),
    )


def build_engine(settings: Settings) -> Engine:
    config = engine_config(settings)
    if settings.engine == "reference":
        return ReferenceEngine(config)
    from padrec_vllm.vllm_plugin.async_engine import VllmEngine

    return VllmEngine(config)
