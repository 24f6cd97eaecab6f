"""Settings -> engine. The vLLM adapter is imported only when asked for (vLLM is optional)."""

from __future__ import annotations

from padrec_vllm.engine_api import Engine, EngineConfig, ReferenceEngine
from server.settings import Settings


def engine_config(settings: Settings) -> EngineConfig:
    kv = settings.vllm_kv_cache_gib
    return EngineConfig(
        artifacts=settings.artifacts,
        head=settings.head if settings.speculative else None,
        num_draft_tokens=settings.num_draft_tokens,
        max_batch_size=settings.max_batch_size,
        dtype=settings.dtype,
        device=settings.device,
        vllm_enforce_eager=settings.vllm_enforce_eager,
        vllm_kv_cache_bytes=int(kv * (1 << 30)) if kv is not None else None,
        vllm_args=dict(settings.vllm_args),
        draft_int8=settings.draft_int8,
        spec_max_batch=settings.spec_max_batch,
    )


def build_engine(settings: Settings) -> Engine:
    config = engine_config(settings)
    if settings.engine == "reference":
        return ReferenceEngine(config)
    from padrec_vllm.vllm_plugin.async_engine import VllmEngine

    return VllmEngine(config)
