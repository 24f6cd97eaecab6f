"""The head's KV cache, and where a call's queries sit in a draft tree.

Tree drafting (``decoding.tree``) sees these only through the drafter protocol
(``decoding.protocol``): it asks the cache for ``tree_scratch(size)``, places each call's queries
with ``TreeScratch.at(...)`` and hands the result back to the head as its ``tree=`` argument.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TreeAttention:
    """Where a decoding call's queries sit in a draft tree.

    Sibling tree nodes share a position, so their keys/values cannot go to the position-addressed
    ``HeadCache``; they go to a per-round scratch instead. A call writes its keys/values at scratch
    entries ``slots`` [T] (the same for every row; the tensors are written in place) and each query
    attends to the cache slots below ``prefix_end`` [B] (the verified positions) plus the scratch
    entries ``visible`` [B, T, M] marks (its tree ancestors and itself). The cache is not written.
    """

    keys: torch.Tensor  # [B, M, Hkv, D]
    values: torch.Tensor  # [B, M, Hkv, D]
    slots: torch.Tensor  # [T]
    visible: torch.Tensor  # [B, T, M] bool
    prefix_end: torch.Tensor  # [B]


@dataclass(frozen=True)
class TreeScratch:
    """Keys/values of one round's tree nodes: M entries per row, zeroed at creation."""

    keys: torch.Tensor  # [B, M, Hkv, D]
    values: torch.Tensor  # [B, M, Hkv, D]

    def at(
        self, slots: torch.Tensor, visible: torch.Tensor, prefix_end: torch.Tensor
    ) -> TreeAttention:
        """The ``tree=`` argument of a call whose queries write scratch entries ``slots`` [T] and
        see the cache below ``prefix_end`` [B] plus the entries ``visible`` [B, T, M] marks."""
        return TreeAttention(self.keys, self.values, slots, visible, prefix_end)


class HeadCache:
    """Position-addressed KV cache of the head's one layer: slot p holds the K/V of position p.

    A call writes its keys/values at its position ids, then a query at position q reads slots
    0..q. So rolling back is free: drafted slots beyond the verified frontier are rewritten by the
    next round's step-1 pass before anything reads them. Callers keep one invariant: every slot
    below the smallest position of a call holds a verified entry. Padding queries must carry
    positions past the row's real ones (they then write only slots that are rewritten later).
    ``capacity`` must exceed every position written; it is fixed, so no call syncs the device.
    """

    def __init__(
        self,
        batch_size: int,
        capacity: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, capacity, num_kv_heads, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)  # [B, S, Hkv, D]
        self.values = torch.zeros(shape, device=device, dtype=dtype)  # [B, S, Hkv, D]

    @property
    def capacity(self) -> int:
        return self.keys.shape[1]

    def write(self, keys: torch.Tensor, values: torch.Tensor, position_ids: torch.Tensor) -> None:
        """keys, values [B, T, Hkv, D] go to slots ``position_ids`` [B, T]."""
        rows = torch.arange(keys.shape[0], device=keys.device)[:, None]  # [B, 1]
        self.keys[rows, position_ids] = keys
        self.values[rows, position_ids] = values

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` [B'] (finished requests leave the batch)."""
        self.keys = self.keys[rows]
        self.values = self.values[rows]

    def tree_scratch(self, size: int) -> TreeScratch:
        """Zeroed scratch of ``size`` tree-node entries per row for one round of tree drafting."""
        b, _, hkv, d = self.keys.shape
        keys = self.keys.new_zeros(b, size, hkv, d)  # [B, M, Hkv, D]
        return TreeScratch(keys, self.values.new_zeros(b, size, hkv, d))
