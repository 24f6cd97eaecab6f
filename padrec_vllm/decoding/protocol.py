"""What the engine needs from a drafter. ``model.decoding_head.DecodingHead`` and ``DraftHead``
implement it; tests use fakes.

A drafter maps (token x_{p+1}, feature f_p, position p) to an output feature, and features to
logits; the engine feeds the output feature of step k back as the input feature of step k+1 and
never looks inside it, so a fake may use any tensor shape [B, T, ...] for it.

Chains need ``Drafter``. Trees (``decoding.tree``) need ``TreeDrafter``: its cache hands out a
per-round ``TreeScratch`` for the tree nodes' keys, and each call is placed in the tree by the
object ``TreeScratch.at`` returns, which decoding passes back to the drafter without looking
inside.
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


class TreeScratch(Protocol):
    def at(self, slots: torch.Tensor, visible: torch.Tensor, prefix_end: torch.Tensor) -> object:
        """The ``tree=`` argument of a call whose T queries write scratch entries ``slots`` [T]
        (the same for every row) and see the cache's positions below ``prefix_end`` [B] plus the
        scratch entries ``visible`` [B, T, M] marks (their tree ancestors and themselves). Such a
        call does not write the cache."""


class TreeDraftCache(DraftCache, Protocol):
    def tree_scratch(self, size: int) -> TreeScratch:
        """Empty scratch for ``size`` tree nodes per row, for one round."""


class TreeDrafter(Drafter, Protocol):
    def new_cache(self, batch_size: int, capacity: int) -> TreeDraftCache:
        """A cache for ``batch_size`` rows and positions 0..capacity-1."""

    def __call__(
        self,
        input_ids: torch.Tensor,  # [B, T]
        features: torch.Tensor,  # [B, T, ...]
        position_ids: torch.Tensor,  # [B, T]
        *,
        step: int,
        embed: nn.Module,
        cache: TreeDraftCache,
        tree: object | None = None,
    ) -> torch.Tensor:  # [B, T, ...]
        """Draft step ``step``; with ``tree`` (from ``TreeScratch.at``) the queries sit in the
        round's draft tree instead of at the cache's positions."""
