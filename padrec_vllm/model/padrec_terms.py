"""The PAD-Rec terms, computed in one place for training and decoding.

Between ``fc`` and the decoder layer a padrec head adds, for the input token x = x_{p+1} at draft
step k (``model.head``)::

    u = u + alpha * item_emb[slot(p + 1, x)]               # item position
    g = sigmoid(w_g . [u; s_k] + b_g), s_k = step_emb[k]   # per-token scalar gate
    u = u + g * s_k

The slot of x, which sits at position p + 1, comes from the head's ``SlotRule``
(``catalog.tokens``): ``slot_of_token[x]`` under the ``token`` rule (per-level format); under the
``position`` rule (shared format) the same table for specials and ``(p + 1 - offset) mod period``
for code tokens (``head_slots``).

Split as the decoding forms need it: ``padrec_terms`` computes the parameter-only part once
(``PadRecTerms``: the item table, ``alpha * item_emb[slot_of_token]`` [V, H] indexed by token id
under the token rule or ``alpha * item_emb`` [num_slots, H] indexed by slot under the position
rule, the step vectors, and the step half of the gate logit, w_g = [w_u; w_s],
``w_s . s_k + b_g``), and ``add_padrec_terms`` applies it to u. ``DraftHead.forward`` runs both
on every call (training gets gradients through them); a ``DecodingHead`` computes the first
once, when it is built, and applies it with ``add_padrec_terms``, its CPU fold
(``model.decoding_head``) or the fused CUDA kernel (``model.triton_terms``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from padrec_vllm.model.config import HeadConfig

ALPHA_INIT = 0.1


class PadRecExtras(nn.Module):
    """PAD-Rec parameters; which exist depends on the ablation switches (checkpoint names
    ``padrec.alpha``, ``padrec.item_emb.weight``, ``padrec.step_emb.weight``, ``padrec.gate.*``)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        h = cfg.hidden_size
        if cfg.has_item_emb:
            self.alpha = nn.Parameter(torch.full((1,), ALPHA_INIT))  # [1]
            self.item_emb = nn.Embedding(cfg.num_slots, h)  # [num_slots, H]
        if cfg.has_step_emb:
            self.step_emb = nn.Embedding(cfg.num_steps + 1, h)  # [K+1, H]; row 0 unused
        if cfg.has_gate:
            self.gate = nn.Linear(2 * h, 1)  # w_g [1, 2H], b_g [1]


class PadRecTerms(NamedTuple):
    """Parameter-only parts of the PAD-Rec terms, per-step rows pre-split; None where the
    ablation switches drop a term."""

    # [V, H] alpha * item_emb[slot_of_token[v]] (token rule) or [num_slots, H] alpha * item_emb
    # (position rule): row ``item_index`` of ``add_padrec_terms``
    item_table: torch.Tensor | None
    step_vecs: tuple[torch.Tensor, ...] | None  # K+1 x [H]: step_emb[k]
    step_logits: tuple[torch.Tensor, ...] | None  # K+1 x [1]: w_s . step_emb[k] + b_g
    w_u: torch.Tensor | None  # [1, H]: the gate's weights on u


NO_TERMS = PadRecTerms(None, None, None, None)  # an eagle head's


def head_slots(slot_of_token: torch.Tensor, period: int, offset: int, input_ids: torch.Tensor,
               position_ids: torch.Tensor) -> torch.Tensor:
    """The slots of a head's input tokens: the input at position p is x_{p+1}, which sits at
    position p + 1, so its slot is ``slot_of_token[x]`` where that is >= 0 and
    ``(p + 1 - offset) mod period`` where it is ``FROM_POSITION`` (-1; position rule only).
    slot_of_token [V], input_ids and position_ids of one shape [...] -> slots [...] (int64).
    ``period`` 0 is the token rule (the table alone). The vLLM draft model calls this too."""
    by_id = slot_of_token[input_ids]  # [...]
    if not period:
        return by_id
    from_pos = (position_ids + (1 - offset)).remainder(period)  # [...]
    return torch.where(by_id >= 0, by_id, from_pos)  # [...]


def padrec_terms(
    extras: PadRecExtras, cfg: HeadConfig, slot_of_token: torch.Tensor | None,
    per_slot: bool = False,
) -> PadRecTerms:
    """The parameter-only part of the terms from the head's ``extras`` and ``slot_of_token`` [V]
    (differentiable: computed from the parameters as they are now). ``per_slot`` (the position
    rule) gives the item table per slot, [num_slots, H], instead of per token."""
    item_table = step_vecs = step_logits = w_u = None
    if cfg.has_item_emb and per_slot:
        item_table = extras.alpha * extras.item_emb.weight  # [num_slots, H]
    elif cfg.has_item_emb:
        item_table = extras.alpha * extras.item_emb.weight[slot_of_token]  # [V, H]
    if cfg.has_step_emb:
        step_vecs = extras.step_emb.weight.unbind(0)  # K+1 x [H]
        if cfg.has_gate:
            w_u, w_s = extras.gate.weight.split(cfg.hidden_size, dim=1)  # [1, H] each
            step_logits = F.linear(extras.step_emb.weight, w_s, extras.gate.bias).split(1)
    return PadRecTerms(item_table, step_vecs, step_logits, w_u)


def add_padrec_terms(
    u: torch.Tensor, item_index: torch.Tensor, terms: PadRecTerms, k: int
) -> torch.Tensor:
    """u [B, T, H] (the output of ``fc``), item_index [B, T] (the rows of ``terms.item_table``:
    the input tokens x_{p+1} under the token rule, their slots under the position rule) ->
    u [B, T, H] with the terms of step-embedding row ``k`` (``HeadConfig.step_row``)."""
    if terms.item_table is not None:
        u = u + F.embedding(item_index, terms.item_table)  # + alpha * item_emb[slot], [B, T, H]
    if terms.step_vecs is not None:
        s = terms.step_vecs[k]  # [H]
        if terms.w_u is not None:
            # w_u . u + (w_s . s_k + b_g)
            logit = F.linear(u, terms.w_u, terms.step_logits[k])  # [B, T, 1]
            u = torch.addcmul(u, torch.sigmoid(logit), s)  # u + g * s_k, [B, T, H]
        else:
            u = u + s  # [B, T, H]
    return u
