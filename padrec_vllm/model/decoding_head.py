"""The decoding form of a draft head: built once, from a ``DraftHead`` and its target, by whoever
decodes (``decoding_head(head, target, int8=...)``).

Contract. A ``DecodingHead`` is a snapshot: it computes what depends on parameters only once, at
build time, and does not follow later updates of the head's or the target's parameters (build a
new one after training or loading; the decoder layer is shared with the head, not copied, so
changing a head in place after building leaves the snapshot inconsistent). It gives the same
math as ``DraftHead.forward`` (up to float rounding) and implements the drafter protocol
(``decoding.protocol``): ``new_cache``, ``__call__`` (with a cache, and ``tree=`` for tree
drafting), ``logits``, ``num_steps``, ``slot_of_token``. Inference only.

What it snapshots:
- on CPU, where each small op costs about as much as a small matmul, the input side folded into
  tables for both head kinds (``fold_tables``)::

    fc([emb(x); f]) = T[x] + W_f f,   T = emb.weight @ W_x^T                  # [V, H]
    padrec: T += alpha * item_emb[slot_of_token], one table T_k per draft step k:
            without a gate T_k = T + s_k; with one, the gate logit w_u . u + w_s . s_k + b_g is
            appended as column H of T_k (T @ w_u^T + w_s . s_k + b_g) and of W_f (w_u @ W_f);
            under the position rule (shared format) the item term is not a function of x, so
            it stays out of T: a per-slot table S = alpha * item_emb (with its gate column
            S @ w_u^T) is added by slot, u = T_k[x] + S[slot] + W_f f

  so a gated padrec step adds only a sigmoid and an addcmul to eagle's, and the other variants
  nothing (same math, different float rounding only);
- on CUDA, the parameter-only PAD-Rec terms (``padrec_terms.PadRecTerms``), applied by one fused
  Triton kernel for a gated head with item embeddings (``triton_terms``), else by
  ``add_padrec_terms``;
- the RoPE table of ``max_position_embeddings`` positions (two lookups per call instead of the
  seven ops of ``rope_cos_sin``; a cache with more slots falls back to computing them).
- on CPU in float (not int8), the decoder layer fused (``fused_layer.FusedLayer``: q, k, v and
  RoPE in one matmul, transposed weights, the tiled RoPE table and a causal mask table), used for
  every call with a cache and without a tree whose cache fits the RoPE table; one token at batch
  1 takes its token and position as ints (``fused_step``). Logits then come from a transposed
  copy of the target's ``lm_head`` when called with that ``lm_head``.

``int8=True`` (a float32 head on CPU): the decoder layer's linears, the logits (an int8 copy of
the target's ``lm_head``) and the fold's feature matrix W_f become ``Int8Linear`` copies held
here; the head itself is left as it is. A CPU draft step is bound by reading the head's weights,
and int8 weights are a quarter of the bytes; only the draft changes (the target still verifies
every draft in its own precision, so the output stays the target's greedy output), the head's
acceptance may move slightly.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from padrec_vllm.catalog.tokens import SlotRule
from padrec_vllm.model.config import HeadConfig
from padrec_vllm.model.fused_layer import FusedLayer, fused_forward, fused_layer, fused_step
from padrec_vllm.model.head import DraftHead
from padrec_vllm.model.head_cache import HeadCache, TreeAttention
from padrec_vllm.model.int8_linear import Int8Linear
from padrec_vllm.model.layers import rope_cos_sin, rope_table
from padrec_vllm.model.padrec_terms import NO_TERMS, PadRecTerms, add_padrec_terms, head_slots

ApplyTerms = Callable[[torch.Tensor, torch.Tensor, PadRecTerms, int], torch.Tensor]
Tensors = torch.Tensor | tuple[torch.Tensor, ...]


class FoldTables(NamedTuple):
    """CPU decoding form of ``fc`` plus the PAD-Rec terms (module docstring)."""

    # K+1 x [V, H'] by draft step. H' = H without a gate; with one, H + 1 (the logit column)
    # padded with zero columns to a multiple of 16 (an odd width slows the matmul)
    tokens: tuple[torch.Tensor, ...]
    features_t: torch.Tensor  # [H, H']: W_f^T, with (w_u @ W_f)^T appended under a gate
    step_vecs: tuple[torch.Tensor, ...] | None  # K+1 x [H], under a gate only
    slot_rows: torch.Tensor | None = None  # [num_slots, H']: S, position rule only


@torch.no_grad()
def fold_tables(head: DraftHead, embed_weight: torch.Tensor) -> FoldTables:
    """The folded input tables of ``head`` with the target's input embedding ``embed_weight``
    [V, H], in float32 inside and the head's dtype at the end."""
    h, steps = head.config.hidden_size, head.config.num_steps + 1
    w_x, w_f = head.fc.weight.float().split(h, dim=1)  # [H, H] each
    base = embed_weight.float() @ w_x.t()  # [V, H]
    features_t = w_f.t()  # [H, H]
    terms = head.terms()
    slot_rows = None
    if terms.item_table is not None and head.by_position:
        slot_rows = terms.item_table.float()  # [num_slots, H]
    elif terms.item_table is not None:
        base = base + terms.item_table.float()
    step_vecs = None
    if terms.w_u is not None:  # gate: logit column, per-step constant inside
        w_u = terms.w_u.float()  # [1, H]
        logit = base @ w_u.t()  # [V, 1]
        pad = -(h + 1) % 16  # zero columns up to a multiple of 16
        tokens = [F.pad(torch.cat((base, logit + c.float()), 1), (0, pad))  # [V, H']
                  for c in terms.step_logits]
        features_t = F.pad(torch.cat((features_t, features_t @ w_u.t()), 1), (0, pad))  # [H, H']
        step_vecs = tuple(s.clone() for s in terms.step_vecs)
        if slot_rows is not None:
            slot_rows = F.pad(torch.cat((slot_rows, slot_rows @ w_u.t()), 1), (0, pad))
    elif terms.step_vecs is not None:  # no gate: s_k is a constant of step k
        tokens = [base + s.float() for s in terms.step_vecs]
    else:  # eagle, padrec without step embedding: one table for every step
        tokens = [base] * steps
    dtype = head.fc.weight.dtype
    if slot_rows is not None:
        slot_rows = slot_rows.to(dtype).contiguous()
    return FoldTables(tuple(t.to(dtype).contiguous() for t in tokens),
                      features_t.to(dtype).contiguous(), step_vecs, slot_rows)


@dataclass(frozen=True, eq=False)
class DecodingHead:
    """A draft head prepared for decoding (module docstring); build it with ``decoding_head``."""

    config: HeadConfig
    slot_of_token: torch.Tensor | None  # [V], the head's (-1: slot from position)
    slot_rule: SlotRule | None  # the head's
    embed: nn.Module  # the target's input embedding the snapshot was built from
    layer: nn.Module  # the head's decoder layer, or its int8 copy
    fc: nn.Module  # the head's input projection (used where nothing is folded)
    fold: FoldTables | None  # CPU: the folded input tables
    feature_proj: nn.Module | None  # int8: fold.features_t as an Int8Linear H -> H'
    terms: PadRecTerms  # CUDA: the parameter-only PAD-Rec terms (NO_TERMS for eagle)
    apply_terms: ApplyTerms  # CUDA: add_padrec_terms or its fused kernel
    lm_head: nn.Module | None  # int8: the target's lm_head as an Int8Linear
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin [S, D]
    fused: FusedLayer | None = None  # CPU float: the layer in few ops (``model.fused_layer``)
    # CPU float: (the target's lm_head, its weight transposed [H, V]) for few-row logits
    lm_head_t: tuple[nn.Module, torch.Tensor] | None = None

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    @property
    def device(self) -> torch.device:
        return self.rope[0].device

    def new_cache(self, batch_size: int, capacity: int) -> HeadCache:
        c = self.config
        return HeadCache(batch_size, capacity, c.num_key_value_heads, c.head_dim,
                         device=self.device, dtype=self.rope[0].dtype)

    def __call__(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        step: int,
        embed: nn.Module,
        cache: HeadCache,
        tree: TreeAttention | None = None,
    ) -> torch.Tensor:
        """``DraftHead.forward`` with a cache: input_ids [B, T], features [B, T, H],
        position_ids [B, T] -> [B, T, H]. ``embed`` must be the embedding it was built with."""
        if embed is not self.embed:
            raise ValueError("a DecodingHead runs with the input embedding it was built from")
        k = self.config.step_row(step)
        f = self.fused
        if f is not None and tree is None and cache.capacity <= f.cos.shape[0]:
            if input_ids.numel() == 1:  # one query: positions and tokens as ints
                token, pos = int(input_ids), int(position_ids)
                u = self._folded_token(token, pos, features.view(1, -1), k)  # [1, H]
                return fused_step(f, u, pos, cache).view(1, 1, -1)  # [1, 1, H]
            u = self._folded_input(input_ids, position_ids, features, k)  # [B, T, H]
            return fused_forward(f, u, position_ids, cache)  # [B, T, H]
        if self.fold is not None:
            u = self._folded_input(input_ids, position_ids, features, k)  # [B, T, H]
        else:
            x = embed(input_ids).to(features.dtype)  # [B, T, H]
            u = self.fc(torch.cat((x, features), dim=-1))  # [B, T, H]
            index = self._item_index(input_ids, position_ids)  # [B, T]
            u = self.apply_terms(u, index, self.terms, k)  # [B, T, H]
        cos, sin = self._rope(position_ids, cache)  # [B, T, D] each
        return self.layer(u, cos, sin, position_ids, cache, None, tree)  # [B, T, H]

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] through the target's ``lm_head`` (or its int8
        copy)."""
        if self.lm_head is not None:
            return self.lm_head(hidden)
        if self.lm_head_t is not None and lm_head is self.lm_head_t[0]:
            return hidden @ self.lm_head_t[1]  # [..., V]
        return lm_head(hidden)

    @property
    def by_position(self) -> bool:
        """Code tokens take their slot from their position (the shared format's rule)."""
        return self.slot_rule is not None and self.slot_rule.kind == "position"

    def _item_index(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """Rows of the item table: token ids (token rule) or slots (position rule) [B, T]."""
        if not self.by_position:
            return input_ids
        r = self.slot_rule
        return head_slots(self.slot_of_token, r.period, r.offset, input_ids, position_ids)

    def _folded_input(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      features: torch.Tensor, k: int) -> torch.Tensor:
        """``fc`` input plus the PAD-Rec terms from the folded tables -> u [B, T, H]."""
        t = self.fold
        b, n, h = features.shape
        x = F.embedding(input_ids, t.tokens[k])  # [B, T, H']
        if t.slot_rows is not None:
            x = x + F.embedding(self._item_index(input_ids, position_ids), t.slot_rows)
        x = x.flatten(0, 1)  # [B*T, H']
        f = features.reshape(b * n, h)  # [B*T, H]
        if self.feature_proj is not None:
            u = (x + self.feature_proj(f)).view(b, n, -1)  # [B, T, H']
        else:
            u = torch.addmm(x, f, t.features_t).view(b, n, -1)  # [B, T, H']
        if t.step_vecs is None:
            return u
        gate = torch.sigmoid(u[..., h : h + 1])  # [B, T, 1]
        return torch.addcmul(u[..., :h], gate, t.step_vecs[k])  # [B, T, H]

    def _folded_token(self, token: int, position: int, feature: torch.Tensor,
                      k: int) -> torch.Tensor:
        """``_folded_input`` of one token at one position: feature [1, H] -> u [1, H]."""
        t = self.fold
        h = feature.shape[1]
        row = t.tokens[k][token : token + 1]  # [1, H']
        if t.slot_rows is not None:
            slot = self.slot_rule.slot(position + 1, token)  # the input sits at position p + 1
            row = row + t.slot_rows[slot : slot + 1]  # [1, H']
        u = torch.addmm(row, feature, t.features_t)  # [1, H']
        if t.step_vecs is None:
            return u
        return torch.addcmul(u[:, :h], torch.sigmoid(u[:, h : h + 1]), t.step_vecs[k])  # [1, H]

    def _rope(self, position_ids: torch.Tensor,
              cache: HeadCache) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin [B, T, D] for ``position_ids`` [B, T] (below ``cache.capacity``)."""
        cos, sin = self.rope  # [S, D] each
        if cache.capacity > cos.shape[0]:
            c = self.config
            return rope_cos_sin(position_ids, c.head_dim, c.rope_theta, cos.dtype)
        return F.embedding(position_ids, cos), F.embedding(position_ids, sin)


def decoding_head(head: DraftHead, target: nn.Module, *, int8: bool = False) -> DecodingHead:
    """The decoding form of ``head`` drafting for ``target`` (a Hugging Face causal LM: its
    ``get_input_embeddings()`` and ``lm_head``); ``head`` is left as it is.

    Raises ValueError for ``int8`` with a head that is not float32 on CPU (the int8 kernels are
    CPU-only and read float32 activations).
    """
    p = head.fc.weight
    if int8 and (p.device.type != "cpu" or p.dtype != torch.float32):
        raise ValueError(f"int8 drafting needs a float32 head on CPU, got {p.dtype} on {p.device}")
    cfg, embed = head.config, target.get_input_embeddings()
    if p.device.type == "cuda":
        fold, (terms, apply_terms) = None, _terms_for(head)
    else:  # the terms are inside the fold
        fold, terms, apply_terms = fold_tables(head, embed.weight), NO_TERMS, add_padrec_terms
    layer, feature_proj, lm_head = head.layers[0], None, None
    if int8:
        layer = _int8_copy(head.layers[0])
        lm_head = Int8Linear(target.lm_head)
        proj = nn.Linear(*fold.features_t.shape, bias=False)  # H -> H'
        proj.weight.data = fold.features_t.t().contiguous()  # [H', H]
        feature_proj = Int8Linear(proj)
    rope = rope_table(cfg.max_position_embeddings, cfg.head_dim, cfg.rope_theta, p.dtype, p.device)
    fused, lm_head_t = None, None
    if fold is not None and not int8:
        fused = fused_layer(head.layers[0], rope)
        if getattr(target.lm_head, "bias", None) is None:
            lm_head_t = (target.lm_head, target.lm_head.weight.detach().t().contiguous())
    return DecodingHead(cfg, head.slot_of_token, head.slot_rule, embed, layer, head.fc, fold,
                        feature_proj, terms, apply_terms, lm_head, rope, fused, lm_head_t)


def _terms_for(head: DraftHead) -> tuple[PadRecTerms, ApplyTerms]:
    """CUDA: the head's terms, detached copies, and the function that applies them."""
    with torch.no_grad():
        terms = head.terms()
        terms = terms._make(None if t is None else _detached(t) for t in terms)
    if terms.item_table is not None and terms.w_u is not None:
        try:
            from padrec_vllm.model.triton_terms import fused_padrec_terms
        except ImportError:  # pragma: no cover - Triton ships with PyTorch's CUDA builds
            return terms, add_padrec_terms
        return terms, fused_padrec_terms
    return terms, add_padrec_terms


def _detached(t: Tensors) -> Tensors:
    """A copy of ``t`` (or of each tensor in it) that shares no storage with the parameters."""
    return tuple(x.detach().clone() for x in t) if isinstance(t, tuple) else t.detach().clone()


def _int8_copy(layer: nn.Module) -> nn.Module:
    """A copy of the decoder ``layer`` whose attention and MLP linears are ``Int8Linear``."""
    q = copy.deepcopy(layer).eval()
    for parent in (q.self_attn, q.mlp):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child))
    return q
