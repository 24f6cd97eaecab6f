"""Reference decoding engine (plain PyTorch): greedy, chain and tree speculative decoding, and
the one accounting of decoding figures that every engine reports."""

from padrec_vllm.decoding.accounting import (
    Aggregate,
    RequestAccounting,
    RequestResult,
    aggregate,
    identical_output_rate,
    result_from_rounds,
)
from padrec_vllm.decoding.engine import generate
from padrec_vllm.decoding.protocol import DraftCache, Drafter, TreeDrafter
from padrec_vllm.decoding.tree import TreeSpec

__all__ = [
    "Aggregate",
    "DraftCache",
    "Drafter",
    "RequestAccounting",
    "RequestResult",
    "TreeDrafter",
    "TreeSpec",
    "aggregate",
    "generate",
    "identical_output_rate",
    "result_from_rounds",
]
