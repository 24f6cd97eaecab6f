"""The target's KV cache with per-row validity, so rows of a batch can keep different counts.

All rows share one slot axis of a transformers ``DynamicCache``. Every forward appends a block of
T slots to every row; afterwards ``keep(n)`` marks the first ``n[r]`` slots of the block valid for
row r and the rest (prompt padding, rejected drafts) as holes, hidden from later queries through
the attention mask. Trailing slots that no row kept are cropped. A row's next position id is
its number of valid slots, so holes never shift positions. Slot 0 is valid in every row (prompts
are non-empty), so no query ever has all keys masked.

A block is causal by default; a draft tree's block (``decoding.tree``) instead gives each input a
depth (position = next position + depth) and a visibility mask over the block, and keeps the
accepted path, whose slots need not be contiguous (``keep_mask``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class TargetKV:
    def __init__(self, target: nn.Module, batch_size: int, device: torch.device) -> None:
        from transformers import DynamicCache

        self.target = target
        self.cache = DynamicCache()
        self.valid = torch.zeros(batch_size, 0, dtype=torch.bool, device=device)  # [B, S]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]
        self._block = 0  # width of the last block

    def forward_block(self, input_ids: torch.Tensor, depths: torch.Tensor | None = None,
                      block_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Target over ``input_ids`` [B, T] at each row's next positions -> features [B, T, H].

        Default: the inputs are causal within the block, at positions next..next+T-1; a row's
        padding must come after its real inputs. A tree block gives ``depths`` [B, T] (input j sits
        at position next + depths[r, j]) and ``block_mask`` [B, T, T] (True: query i sees input j).
        """
        b, t = input_ids.shape
        if (depths is None) != (block_mask is None):
            raise ValueError("a tree block needs both depths and block_mask")
        steps = torch.arange(t, device=input_ids.device)  # [T]
        position_ids = self.lengths[:, None] + (steps if depths is None else depths)  # [B, T]
        block = torch.ones(b, t, dtype=torch.bool, device=input_ids.device)  # [B, T]
        self.valid = torch.cat((self.valid, block), dim=1)  # [B, S + T]
        self._block = t
        mask = self.valid.long()  # [B, S + T]
        if block_mask is not None:
            past = self.valid[:, None, :-t].expand(b, t, -1)  # [B, T, S]
            seen = torch.cat((past, block_mask), dim=2)[:, None]  # [B, 1, T, S + T]
            dtype = self.target.get_input_embeddings().weight.dtype
            mask = torch.zeros(seen.shape, dtype=dtype, device=seen.device)  # additive: 0 = seen
            mask.masked_fill_(~seen, torch.finfo(dtype).min)
        out = self.target.model(
            input_ids=input_ids,
            attention_mask=mask,
            position_ids=position_ids,
            past_key_values=self.cache,
            use_cache=True,
        )
        return out.last_hidden_state  # [B, T, H]

    def keep(self, counts: torch.Tensor) -> None:
        """Keep the first ``counts[r]`` [B] slots of the last block of row r; drop the rest."""
        steps = torch.arange(self._block, device=counts.device)  # [T]
        self.keep_mask(steps[None, :] < counts[:, None])

    def keep_mask(self, kept: torch.Tensor) -> None:
        """Keep the slots of the last block where ``kept`` [B, T] is True; drop the rest. The kept
        inputs must have held positions next..next+n-1 (n kept in the row)."""
        t, self._block = self._block, 0
        if t == 0:
            raise RuntimeError("keep() must follow a forward_block()")
        self.valid[:, -t:] = kept  # [B, T]
        self.lengths = self.lengths + kept.sum(dim=1)  # [B]
        self._crop_tail()

    def select(self, rows: torch.Tensor) -> None:
        """Keep only batch rows ``rows`` [B'] (finished requests leave the batch)."""
        self.cache.batch_select_indices(rows)
        self.valid = self.valid[rows]  # [B', S]
        self.lengths = self.lengths[rows]  # [B']
        self._crop_tail()

    def _crop_tail(self) -> None:
        used = self.valid.any(dim=0).nonzero()  # [n, 1]
        keep = int(used.max()) + 1 if used.numel() else 0
        drop = self.valid.shape[1] - keep
        if drop > 0:
            self.cache.crop(-drop)
            self.valid = self.valid[:, :keep]  # [B, S']


class Prefill(NamedTuple):
    """A batch's prompts after the prefill forward (``prefill``)."""

    kv: TargetKV  # holds the prompts, padding marked as holes
    ids: torch.Tensor  # [B, T]: the prompts, right-padded with id 0
    lens: torch.Tensor  # [B]: prompt lengths
    feats: torch.Tensor  # [B, T, H]: the target's features
    last_logits: torch.Tensor  # [B, V]: logits after each row's last prompt token


def prefill(target: nn.Module, prompts: list[list[int]], device: torch.device) -> Prefill:
    """One target forward over the right-padded ``prompts`` (each non-empty) into a new cache."""
    b = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)  # [B]
    ids = torch.zeros(b, int(lens.max()), dtype=torch.long, device=device)  # [B, T]
    for r, p in enumerate(prompts):
        ids[r, : len(p)] = torch.tensor(p, device=device)
    kv = TargetKV(target, b, device)
    feats = kv.forward_block(ids)  # [B, T, H]
    kv.keep(lens)
    last = feats[torch.arange(b, device=device), lens - 1]  # [B, H]
    return Prefill(kv, ids, lens, feats, target.lm_head(last))
