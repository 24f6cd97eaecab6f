"""What the engine needs from a drafter. ``DraftHead`` implements it; tests use fakes.

A drafter maps (token x_{p+1}, feature f_p, position p) to an output feature, and features to
logits; the engine feeds the output feature of step k back as the input feature of step k+1 and
never looks inside it, so a fake may use any tensor shape [B, T, ...] for it.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn


class DraftCache(Protocol):
    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` [B']."""


class Drafter(Protocol):
    def new_cache(self, batch_size: int, capacity: int) -> DraftCache:
        """A cache for ``batch_size`` rows and positions 0..capacity-1."""

    def __call__(
        self,
        input_ids: torch.Tensor,  # [B, T]
        features: torch.Tensor,  # [B, T, ...]
        position_ids: torch.Tensor,  # [B, T]
        *,
        step: int,
        embed: nn.Module,
        cache: DraftCache,
    ) -> torch.Tensor:  # [B, T, ...]
        """Draft step ``step`` (1 = the pass over verified positions, then 2..K)."""

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """[B, T, ...] -> [B, T, V]."""
