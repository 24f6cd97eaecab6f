"""Reference decoding engine (plain PyTorch): greedy, chain and tree speculative decoding."""

from padrec_vllm.decoding.engine import generate
from padrec_vllm.decoding.protocol import DraftCache, Drafter
from padrec_vllm.decoding.results import Aggregate, RequestResult, aggregate, identical_output_rate
from padrec_vllm.decoding.tree import TreeSpec

__all__ = [
    "Aggregate",
    "DraftCache",
    "Drafter",
    "RequestResult",
    "TreeSpec",
    "aggregate",
    "generate",
    "identical_output_rate",
]
