"""Reference decoding engine (plain PyTorch): greedy and chain speculative decoding."""

from padrec_vllm.decoding.engine import generate
from padrec_vllm.decoding.protocol import DraftCache, Drafter
from padrec_vllm.decoding.results import Aggregate, RequestResult, aggregate, identical_output_rate

__all__ = [
    "Aggregate",
    "DraftCache",
    "Drafter",
    "RequestResult",
    "aggregate",
    "generate",
    "identical_output_rate",
]
