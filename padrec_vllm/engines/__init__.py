"""Decoding engines behind one interface (``api.Engine``), each with its own config.

``ReferenceEngine`` (plain PyTorch) lives here; the vLLM engine is
``padrec_vllm.vllm_plugin.async_engine.VllmEngine`` (only that package imports vLLM).
"""

from padrec_vllm.decoding.accounting import RequestResult
from padrec_vllm.engines.api import Engine, EngineError
from padrec_vllm.engines.calibration import Calibration, calibrate
from padrec_vllm.engines.config import EngineConfig, ReferenceEngineConfig, VllmEngineConfig
from padrec_vllm.engines.reference import ReferenceEngine
from padrec_vllm.engines.schedule import SpecRange, SpecSchedule

__all__ = [
    "Calibration",
    "Engine",
    "EngineConfig",
    "EngineError",
    "ReferenceEngine",
    "ReferenceEngineConfig",
    "RequestResult",
    "SpecRange",
    "SpecSchedule",
    "VllmEngineConfig",
    "calibrate",
]
