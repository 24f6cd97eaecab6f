"""Draft heads: the EAGLE-1 body and its PAD-Rec variant (docs/DESIGN.md).

The body follows vLLM 0.32 ``vllm/model_executor/models/llama_eagle.py`` (EAGLE-1, upstream
https://github.com/SafeAILab/EAGLE/blob/main/eagle/model/cnets1.py), tensor for tensor, so a
checkpoint trained here runs unchanged in vLLM.

Contract. The input at position p is a feature ``f_p`` [H] (the target's last hidden state after its
final norm, or the head's own output feature from the previous draft step) and the token
``x_{p+1}``, with position id p. The output ``h_p`` [H] approximates ``f_{p+1}``; the target's
``lm_head(h_p)`` gives logits for ``x_{p+2}``::

    u = fc([emb(x_{p+1}); f_p])                          # emb = the target's embed_tokens (frozen)
    padrec only:
      u = u + alpha * item_emb[slot(p + 1, x_{p+1})]      # item position (SlotRule)
      g = sigmoid(w_g . [u; s_k] + b_g), s_k = step_emb[k] # per-token scalar gate
      u = u + g * s_k                                      # draft step k (1 = verified pass)
    r = u + attn(u)                                        # no input norm; RoPE; causal
    h = r + mlp(post_attention_layernorm(r))               # no final norm

The slot rule (``catalog.tokens.SlotRule``): per-level heads read the slot from the token id,
shared-format heads read a code token's slot from its position (``padrec_terms.head_slots``).

Ablations (padrec): ``use_item_emb=False`` drops alpha and item_emb; ``use_step_emb=False`` drops
step_emb and the gate; ``use_gate=False`` drops the gate and adds ``s_k`` unscaled.

Initialisation of the PAD-Rec extras, chosen so that a fresh padrec head is close to a fresh eagle
head: item and step embeddings ~ N(0, sigma), sigma = initializer_range (0.02), and ``alpha = 0.1``
make the added terms about 0.1 sigma (item) and 0.5 sigma (step) per dimension, small next to
``u``; gate weight ~ N(0, sigma) and bias 0 start the gate near 0.5, where the sigmoid's gradient is
largest (and alpha != 0 lets item_emb learn from the first step).

Steps beyond ``num_steps`` reuse the last step embedding (a head trained for K steps can be run
with more draft tokens).

``DraftHead.forward`` is the definition: it computes every term from the parameters on every call
(training, tests, checkpoints). Decoding builds a ``DecodingHead`` from it once
(``model.decoding_head``): the same math with the parameter-only work done at build time.
"""

from __future__ import annotations

import torch
from torch import nn

from padrec_vllm.catalog.tokens import PER_LEVEL, SlotRule
from padrec_vllm.model.config import HeadConfig
from padrec_vllm.model.head_cache import HeadCache, TreeAttention
from padrec_vllm.model.layers import DecoderLayer, rope_cos_sin
from padrec_vllm.model.padrec_terms import (
    NO_TERMS,
    PadRecExtras,
    PadRecTerms,
    add_padrec_terms,
    head_slots,
    padrec_terms,
)


class DraftHead(nn.Module):
    """EAGLE-1 / PAD-Rec draft head. Owns neither the embedding nor ``lm_head`` (the target's).

    ``forward`` serves training (no cache: causal over T, optional padding ``attention_mask``) and
    decoding (with a ``HeadCache``: attends to cached positions <= its own).

    ``slot_of_token`` is the head's ``SlotRule``, or a [V] table of slots by token id (the
    token rule of the per-level format); ``slot_rule`` is the rule either way (None without).
    """

    def __init__(self, config: HeadConfig,
                 slot_of_token: SlotRule | torch.Tensor | list[int] | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.slot_rule: SlotRule | None = None
        if isinstance(slot_of_token, SlotRule):
            self.slot_rule = slot_of_token
            if slot_of_token.num_slots != config.num_slots:
                raise ValueError(f"the slot rule has {slot_of_token.num_slots} slots, "
                                 f"the head {config.num_slots}")
            slot_of_token = torch.tensor(slot_of_token.table, dtype=torch.long)
            if slot_of_token.shape != (config.vocab_size,):
                raise ValueError(f"slot_of_token has shape {tuple(slot_of_token.shape)}, "
                                 f"want ({config.vocab_size},)")
            self.register_buffer("slot_of_token", slot_of_token, persistent=False)  # [V]
        elif slot_of_token is not None:
            slot_of_token = torch.as_tensor(slot_of_token, dtype=torch.long)
            if slot_of_token.shape != (config.vocab_size,):
                raise ValueError(
                    f"slot_of_token has shape {tuple(slot_of_token.shape)}, "
                    f"want ({config.vocab_size},)"
                )
            if int(slot_of_token.min()) < 0 or int(slot_of_token.max()) >= config.num_slots:
                raise ValueError(f"slot_of_token values must lie in 0..{config.num_slots - 1}")
            self.register_buffer("slot_of_token", slot_of_token, persistent=False)  # [V]
            self.slot_rule = SlotRule(PER_LEVEL, tuple(slot_of_token.tolist()), config.num_slots)
        elif config.has_item_emb:
            raise ValueError("a padrec head with item embeddings needs slot_of_token")
        else:
            self.register_buffer("slot_of_token", None, persistent=False)
        self.fc = nn.Linear(2 * h, h, bias=False)
        self.layers = nn.ModuleList([DecoderLayer(config)])
        self._init_weights(self)
        # created and initialised after the shared body, so that under one seed every head kind
        # and ablation starts from the same body weights (a controlled comparison)
        self.padrec = PadRecExtras(config) if config.kind == "padrec" else None
        if self.padrec is not None:
            self._init_weights(self.padrec)

    @property
    def num_steps(self) -> int:
        return self.config.num_steps

    def _init_weights(self, root: nn.Module) -> None:
        """N(0, initializer_range) for every Linear/Embedding weight under ``root``, zero biases."""
        std = self.config.initializer_range
        for module in root.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def new_cache(self, batch_size: int, capacity: int) -> HeadCache:
        p = self.fc.weight
        return HeadCache(
            batch_size, capacity, self.config.num_key_value_heads, self.config.head_dim,
            device=p.device, dtype=p.dtype,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        features: torch.Tensor,
        position_ids: torch.Tensor,
        *,
        step: int,
        embed: nn.Module,
        cache: HeadCache | None = None,
        attention_mask: torch.Tensor | None = None,
        tree: TreeAttention | None = None,
    ) -> torch.Tensor:
        """(x_{p+1}, f_p, p) -> h_p: input_ids [B, T], features [B, T, H], position_ids [B, T].

        ``step`` is the draft step k (1 = pass over verified tokens); ``embed`` the target's input
        embedding; ``attention_mask`` [B, T] (1 = real token) only without a cache; ``tree`` (with
        a cache) places the queries in a draft tree instead of at the cache's positions.
        """
        k = self.config.step_row(step)
        if cache is not None and attention_mask is not None:
            raise ValueError("attention_mask is for cache-free (training) calls only")
        if tree is not None and cache is None:
            raise ValueError("tree attention needs a cache (the verified prefix)")
        x = embed(input_ids).to(features.dtype)  # [B, T, H]
        u = self.fc(torch.cat((x, features), dim=-1))  # [B, T, H]
        if self.padrec is not None:
            u = add_padrec_terms(u, self.item_index(input_ids, position_ids), self.terms(), k)
        cfg = self.config
        cos, sin = rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, u.dtype)  # [B, T, D]
        return self.layers[0](u, cos, sin, position_ids, cache, attention_mask, tree)  # [B, T, H]

    @property
    def by_position(self) -> bool:
        """Code tokens take their slot from their position (the shared format's rule)."""
        return self.slot_rule is not None and self.slot_rule.kind == "position"

    def item_index(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """The rows of ``terms().item_table`` for input_ids at position_ids [B, T]: the token ids
        (token rule) or their slots (position rule, ``head_slots``) [B, T]."""
        if not self.by_position:
            return input_ids
        r = self.slot_rule
        return head_slots(self.slot_of_token, r.period, r.offset, input_ids, position_ids)

    def terms(self) -> PadRecTerms:
        """The parameter-only PAD-Rec terms as the parameters are now (differentiable);
        ``NO_TERMS`` for an eagle head."""
        if self.padrec is None:
            return NO_TERMS
        return padrec_terms(self.padrec, self.config, self.slot_of_token, self.by_position)

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] through the target's ``lm_head``."""
        return lm_head(hidden)
