"""Draft heads: the EAGLE-1 body and its PAD-Rec variant (DESIGN.md section 4).

The body follows vLLM 0.32 ``vllm/model_executor/models/llama_eagle.py`` (EAGLE-1, upstream
https://github.com/SafeAILab/EAGLE/blob/main/eagle/model/cnets1.py), tensor for tensor, so a
checkpoint trained here runs unchanged in vLLM.

Contract. The input at position p is a feature ``f_p`` [H] (the target's last hidden state after its
final norm, or the head's own output feature from the previous draft step) and the token
``x_{p+1}``, with position id p. The output ``h_p`` [H] approximates ``f_{p+1}``; the target's
``lm_head(h_p)`` gives logits for ``x_{p+2}``::

    u = fc([emb(x_{p+1}); f_p])                          # emb = the target's embed_tokens (frozen)
    padrec only:
      u = u + alpha * item_emb[slot_of_token[x_{p+1}]]    # item position
      g = sigmoid(w_g . [u; s_k] + b_g), s_k = step_emb[k] # per-token scalar gate
      u = u + g * s_k                                      # draft step k (1 = verified pass)
    r = u + attn(u)                                        # no input norm; RoPE; causal
    h = r + mlp(post_attention_layernorm(r))               # no final norm

Ablations (padrec): ``use_item_emb=False`` drops alpha and item_emb; ``use_step_emb=False`` drops
step_emb and the gate; ``use_gate=False`` drops the gate and adds ``s_k`` unscaled.

Initialisation of the PAD-Rec extras, chosen so that a fresh padrec head is close to a fresh eagle
head: item and step embeddings ~ N(0, sigma), sigma = initializer_range (0.02), and ``alpha = 0.1``
make the added terms about 0.1 sigma (item) and 0.5 sigma (step) per dimension, small next to
``u``; gate weight ~ N(0, sigma) and bias 0 start the gate near 0.5, where the sigmoid's gradient is
largest (and alpha != 0 lets item_emb learn from the first step).

Overhead over eagle, kept small for decoding: the parameter-only terms (the per-token table
``alpha * item_emb[slot_of_token]`` [V, H], and the step half of the gate logit) are cached while
no gradient is recorded. On CUDA the rest (a gather, an add, a [B, T, H] x [H] dot with bias, a
sigmoid and an addcmul) runs as one Triton kernel (``fused_kernel``; fp32 inside): measured on an
H100, bf16, a 512-wide head step under CUDA graph replay costs 1.3-1.8% more than eagle's at
batch 1/8/32 (unfused: 7.5-12%). On CPU, where each small op costs about as much as a small
matmul, inference folds the input side into tables for both head kinds (``_decode_tables``)::

    fc([emb(x); f]) = T[x] + W_f f,   T = emb.weight @ W_x^T                  # [V, H]
    padrec: T += alpha * item_emb[slot_of_token], one table T_k per draft step k:
            without a gate T_k = T + s_k; with one, the gate logit w_u . u + w_s . s_k + b_g is
            appended as column H of T_k (T @ w_u^T + w_s . s_k + b_g) and of W_f (w_u @ W_f)

so a gated padrec step adds only a sigmoid and an addcmul to eagle's, and the other variants
nothing (same math, different float rounding only).

Steps beyond ``num_steps`` reuse the last step embedding (a head trained for K steps can be run
with more draft tokens).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

try:  # on CUDA the decoding-time PAD-Rec terms run as one fused Triton kernel
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - Triton ships with PyTorch's CUDA builds
    triton = None

KINDS = ("eagle", "padrec")
ALPHA_INIT = 0.1


@dataclass(frozen=True)
class HeadConfig:
    """Shape of a draft head. The Llama fields are the target's (the head lives in its space)."""

    kind: str  # "eagle" | "padrec"
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    num_slots: int  # item slots (TokenLayout.num_slots)
    num_steps: int  # K: draft steps the head is trained for
    use_item_emb: bool = True  # padrec only
    use_step_emb: bool = True  # padrec only
    use_gate: bool = True  # padrec only
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"head kind must be one of {KINDS}, got {self.kind!r}")
        if self.num_steps < 1 or self.num_slots < 1:
            raise ValueError("num_steps and num_slots must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def has_item_emb(self) -> bool:
        return self.kind == "padrec" and self.use_item_emb

    @property
    def has_step_emb(self) -> bool:
        return self.kind == "padrec" and self.use_step_emb

    @property
    def has_gate(self) -> bool:
        return self.has_step_emb and self.use_gate

    @classmethod
    def from_target(
        cls,
        config,
        kind: str,
        *,
        num_slots: int,
        num_steps: int,
        use_item_emb: bool = True,
        use_step_emb: bool = True,
        use_gate: bool = True,
    ) -> "HeadConfig":
        """Head config from the target's ``LlamaConfig`` (transformers 4.x or 5.x field layout)."""
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        rope = dict(rope or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"the draft head supports default RoPE only, target has {rope_type!r}")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"draft head needs a SiLU MLP, target has {config.hidden_act!r}")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("draft head supports targets without attention/MLP biases only")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            kind=kind,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(theta if theta is not None else 10000.0),
            max_position_embeddings=config.max_position_embeddings,
            vocab_size=config.vocab_size,
            num_slots=num_slots,
            num_steps=num_steps,
            use_item_emb=use_item_emb,
            use_step_emb=use_step_emb,
            use_gate=use_gate,
            initializer_range=getattr(config, "initializer_range", 0.02),
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_id=getattr(config, "eos_token_id", None),
            pad_token_id=getattr(config, "pad_token_id", None),
        )


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

    def scratch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeroed keys, values [B, size, Hkv, D] for the tree nodes of one round (``TreeAttention``)."""
        b, _, hkv, d = self.keys.shape
        return (self.keys.new_zeros(b, size, hkv, d), self.values.new_zeros(b, size, hkv, d))


@dataclass(frozen=True)
class TreeAttention:
    """Where a decoding call's queries sit in a draft tree (``decoding.tree``).

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


def rope_cos_sin(
    position_ids: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Default RoPE for ``position_ids`` [B, T] -> cos, sin [B, T, D] (HF Llama = vLLM neox)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=position_ids.device).float() / head_dim)
    )  # [D/2]
    freqs = position_ids[..., None].float() * inv_freq  # [B, T, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, T, D]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)  # [..., D/2] each
    return torch.cat((-x2, x1), dim=-1)  # [..., D]


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, heads, D], cos/sin [B, T, D]."""
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]  # [B, T, 1, D]
    return x * cos + _rotate_half(x) * sin  # [B, T, heads, D]


class RMSNorm(nn.Module):
    """Llama RMSNorm (statistics in float32, as HF and vLLM compute it)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()  # [..., H]
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)  # [..., H]
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = d
        self.q_proj = nn.Linear(h, self.num_heads * d, bias=False)
        self.k_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.v_proj = nn.Linear(h, self.num_kv_heads * d, bias=False)
        self.o_proj = nn.Linear(self.num_heads * d, h, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        position_ids: torch.Tensor,
        cache: HeadCache | None,
        attention_mask: torch.Tensor | None,
        tree: TreeAttention | None = None,
    ) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)  # [B, T, Hq, D]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, Hkv, D]
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        if tree is not None:
            tree.keys[:, tree.slots] = k
            tree.values[:, tree.slots] = v
            slots = torch.arange(cache.capacity, device=x.device)  # [S]
            prefix = slots[None, None, :] < tree.prefix_end[:, None, None]  # [B, 1, S]
            mask = torch.cat((prefix.expand(b, t, -1), tree.visible), dim=2)  # [B, T, S + M]
            k = torch.cat((cache.keys, tree.keys), dim=1)  # [B, S + M, Hkv, D]
            v = torch.cat((cache.values, tree.values), dim=1)  # [B, S + M, Hkv, D]
        elif cache is not None:
            cache.write(k, v, position_ids)
            k, v = cache.keys, cache.values  # [B, S, Hkv, D]
            slots = torch.arange(k.shape[1], device=x.device)  # [S]
            mask = slots[None, None, :] <= position_ids[:, :, None]  # [B, T, S]
        else:
            mask = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()[None]  # [1, T, T]
            if attention_mask is not None:
                # padding keys are hidden; the diagonal stays visible so no query row is all-masked
                eye = torch.eye(t, dtype=torch.bool, device=x.device)[None]  # [1, T, T]
                mask = mask & (attention_mask[:, None, :].bool() | eye)  # [B, T, T]
        groups = self.num_heads // self.num_kv_heads
        q = q.transpose(1, 2)  # [B, Hq, T, D]
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # [B, Hkv, S, D]
        if groups > 1:
            k = k.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
            v = v.repeat_interleave(groups, dim=1)  # [B, Hq, S, D]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None])  # [B, Hq, T, D]
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))  # [B, T, H]


class MLP(nn.Module):
    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # [B, T, H]


class DecoderLayer(nn.Module):
    """Llama decoder layer without ``input_layernorm`` (EAGLE-1 layer 0)."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, u, cos, sin, position_ids, cache, attention_mask, tree=None) -> torch.Tensor:
        r = u + self.self_attn(u, cos, sin, position_ids, cache, attention_mask, tree)  # [B, T, H]
        return r + self.mlp(self.post_attention_layernorm(r))  # [B, T, H]


if triton is not None:

    @triton.jit
    def _padrec_terms_kernel(u_ptr, ids_ptr, table_ptr, step_ptr, w_ptr, logit_ptr, out_ptr, H,
                             BLOCK: tl.constexpr):
        """Row n: v = u[n] + table[ids[n]]; out[n] = v + sigmoid(w . v + logit_k) * step_k."""
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < H
        tok = tl.load(ids_ptr + row)
        v = tl.load(u_ptr + row * H + offs, mask=mask, other=0.0).to(tl.float32)
        v += tl.load(table_ptr + tok * H + offs, mask=mask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        s = tl.load(step_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.sigmoid(tl.sum(v * w, axis=0) + tl.load(logit_ptr).to(tl.float32))
        tl.store(out_ptr + row * H + offs, (v + g * s).to(out_ptr.dtype.element_ty), mask=mask)


def _fused_padrec_terms(u, input_ids, table, step_vec, w_u, step_logit) -> torch.Tensor:
    """One-kernel form of ``_add_positions`` for inference on CUDA (no autograd)."""
    h = u.shape[-1]
    rows = u.reshape(-1, h).contiguous()  # [N, H]
    out = torch.empty_like(rows)  # [N, H]
    _padrec_terms_kernel[(rows.shape[0],)](
        rows, input_ids.reshape(-1).contiguous(), table, step_vec, w_u, step_logit, out, h,
        BLOCK=triton.next_power_of_2(h),
    )
    return out.view_as(u)  # [B, T, H]


class _PadRecTerms(NamedTuple):
    """Parameter-only parts of the PAD-Rec terms, per-step rows pre-split."""

    item_table: torch.Tensor | None  # [V, H]: alpha * item_emb[slot_of_token[v]]
    step_vecs: tuple[torch.Tensor, ...] | None  # K+1 x [H]: step_emb[k]
    step_logits: tuple[torch.Tensor, ...] | None  # K+1 x [1]: w_s . step_emb[k] + b_g
    w_u: torch.Tensor | None  # [1, H]: the gate's weights on u


class _DecodeTables(NamedTuple):
    """CPU inference form of ``fc`` plus the PAD-Rec terms (see the module docstring)."""

    tokens: tuple[torch.Tensor, ...]  # K+1 x [V, H'] by draft step; under a gate H' = H + 1 rounded up to 16
    features_t: torch.Tensor  # [H, H']: W_f^T, with (w_u @ W_f)^T appended under a gate
    step_vecs: tuple[torch.Tensor, ...] | None  # K+1 x [H], under a gate only


_registrations = 0  # parameters registered on any module in this process (see _count_registration)


def _count_registration(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
    """Global hook: a parameter was (re)registered somewhere, e.g. ``module.weight = Parameter(...)``
    or ``load_state_dict(assign=True)``, so cached parameter lists may be stale."""
    global _registrations
    _registrations += 1


torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


def _param_key(tensors: Sequence[torch.Tensor]) -> tuple | None:
    """Identity of ``tensors``' current values (storage and version counter), or None when they
    cannot be tracked (gradients recorded, or tensors made under ``torch.inference_mode``)."""
    if torch.is_grad_enabled():
        return None
    key = []
    for t in tensors:
        if t.is_inference():
            return None
        key.append((t.data_ptr(), t._version))
    return tuple(key)


class PadRecExtras(nn.Module):
    """PAD-Rec parameters; which exist depends on the ablation switches."""

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


class DraftHead(nn.Module):
    """EAGLE-1 / PAD-Rec draft head. Owns neither the embedding nor ``lm_head`` (the target's).

    ``forward`` serves training (no cache: causal over T, optional padding ``attention_mask``) and
    decoding (with a ``HeadCache``: attends to cached positions <= its own).
    """

    def __init__(self, config: HeadConfig, slot_of_token: torch.Tensor | None = None) -> None:
        super().__init__()
        self.config = config
        h = config.hidden_size
        if slot_of_token is not None:
            slot_of_token = torch.as_tensor(slot_of_token, dtype=torch.long)
            if slot_of_token.shape != (config.vocab_size,):
                raise ValueError(
                    f"slot_of_token has shape {tuple(slot_of_token.shape)}, "
                    f"want ({config.vocab_size},)"
                )
            if int(slot_of_token.min()) < 0 or int(slot_of_token.max()) >= config.num_slots:
                raise ValueError(f"slot_of_token values must lie in 0..{config.num_slots - 1}")
            self.register_buffer("slot_of_token", slot_of_token, persistent=False)  # [V]
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
        self._terms_key: tuple | None = None  # cache of _padrec_terms() for inference
        self.fused_kernel = True  # inference on CUDA: the PAD-Rec terms as one Triton kernel
        self._terms: _PadRecTerms | None = None
        self._tables_key: tuple | None = None  # cache of _decode_tables() (CPU inference)
        self._tables: _DecodeTables | None = None
        self._rope_table: tuple[torch.Tensor, torch.Tensor] | None = None  # cos, sin [S, D] (decoding)
        self._params: tuple[nn.Parameter, ...] = ()  # cache of _folded_parameters()
        self._params_at = -1  # _registrations when _params was taken
        # set by int8_linear.quantize_head on its inference copy: int8 logits and feature projection
        self.draft_lm_head: nn.Module | None = None
        self.draft_feature_proj: nn.Module | None = None

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
        if step < 1:
            raise ValueError(f"draft step must be >= 1, got {step}")
        if cache is not None and attention_mask is not None:
            raise ValueError("attention_mask is for cache-free (training) calls only")
        if tree is not None and cache is None:
            raise ValueError("tree attention needs a cache (the verified prefix)")
        tables = None if features.is_cuda else self._decode_tables(embed)
        if tables is not None:
            u = self._folded_input(tables, input_ids, features, step)  # [B, T, H]
        else:
            x = embed(input_ids).to(features.dtype)  # [B, T, H]
            u = self.fc(torch.cat((x, features), dim=-1))  # [B, T, H]
            if self.padrec is not None:
                u = self._add_positions(u, input_ids, step)
        cos, sin = self._rope(position_ids, u.dtype, cache)  # [B, T, D] each
        return self.layers[0](u, cos, sin, position_ids, cache, attention_mask, tree)  # [B, T, H]

    def _rope(self, position_ids: torch.Tensor, dtype: torch.dtype,
              cache: HeadCache | None) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE cos, sin [B, T, D] for ``position_ids`` [B, T]. Decoding (a cache, no gradient)
        reads them from a table of ``cache.capacity`` positions built once, so a draft step costs
        two lookups instead of the seven ops of ``rope_cos_sin``."""
        cfg = self.config
        if cache is None or torch.is_grad_enabled():
            return rope_cos_sin(position_ids, cfg.head_dim, cfg.rope_theta, dtype)
        table = self._rope_table
        if (table is None or table[0].shape[0] < cache.capacity or table[0].dtype != dtype
                or table[0].device != position_ids.device):
            every = torch.arange(cache.capacity, device=position_ids.device)[None]  # [1, S]
            cos, sin = rope_cos_sin(every, cfg.head_dim, cfg.rope_theta, dtype)  # [1, S, D] each
            table = self._rope_table = (cos[0], sin[0])  # [S, D] each
        return F.embedding(position_ids, table[0]), F.embedding(position_ids, table[1])

    def _add_positions(self, u: torch.Tensor, input_ids: torch.Tensor, step: int) -> torch.Tensor:
        terms = self._padrec_terms()
        k = min(step, self.config.num_steps)
        if (
            self.fused_kernel and triton is not None and u.is_cuda and not torch.is_grad_enabled()
            and terms.item_table is not None and terms.w_u is not None
        ):
            return _fused_padrec_terms(
                u, input_ids, terms.item_table, terms.step_vecs[k], terms.w_u, terms.step_logits[k]
            )
        if terms.item_table is not None:
            u = u + F.embedding(input_ids, terms.item_table)  # + alpha * item_emb[slot], [B, T, H]
        if terms.step_vecs is not None:
            s = terms.step_vecs[k]  # [H]
            if terms.w_u is not None:
                # w_u . u + (w_s . s_k + b_g)
                logit = F.linear(u, terms.w_u, terms.step_logits[k])  # [B, T, 1]
                u = torch.addcmul(u, torch.sigmoid(logit), s)  # u + g * s_k, [B, T, H]
            else:
                u = u + s  # [B, T, H]
        return u

    def _folded_input(self, t: _DecodeTables, input_ids: torch.Tensor, features: torch.Tensor,
                      step: int) -> torch.Tensor:
        """``fc`` input plus the PAD-Rec terms from the folded tables -> u [B, T, H]."""
        b, n, h = features.shape
        k = min(step, self.config.num_steps)
        x = F.embedding(input_ids, t.tokens[k]).flatten(0, 1)  # [B*T, H']
        f = features.reshape(b * n, h)  # [B*T, H]
        if self.draft_feature_proj is not None:  # int8 copy of features_t (int8_linear)
            u = (x + self.draft_feature_proj(f)).view(b, n, -1)  # [B, T, H']
        else:
            u = torch.addmm(x, f, t.features_t).view(b, n, -1)  # [B, T, H']
        if t.step_vecs is None:
            return u
        return torch.addcmul(u[..., :h], torch.sigmoid(u[..., h : h + 1]), t.step_vecs[k])  # [B, T, H]

    def _folded_parameters(self) -> tuple[nn.Parameter, ...]:
        """The parameters folded into the decoding tables (``fc`` and the PAD-Rec extras), cached
        until a parameter is registered anywhere: walking the modules on every forward cost 30-45 us,
        a few percent of a CPU draft step. In-place updates and ``.to()`` keep the objects and
        change their version or storage, which the table key sees."""
        if self._params_at != _registrations:
            extras = tuple(self.padrec.parameters()) if self.padrec is not None else ()
            self._params, self._params_at = (self.fc.weight, *extras), _registrations
        return self._params

    def _decode_tables(self, embed: nn.Module) -> _DecodeTables | None:
        """The folded input tables, cached while no gradient is recorded and keyed on the values of
        the folded parameters and ``embed``'s weight; None when they cannot be cached (then the
        caller takes the unfolded path)."""
        key = _param_key([embed.weight, *self._folded_parameters()])
        if key is None:
            return None
        if self._tables_key == key:
            return self._tables
        h, steps = self.config.hidden_size, self.config.num_steps + 1
        w_x, w_f = self.fc.weight.float().split(h, dim=1)  # [H, H] each
        base = embed.weight.float() @ w_x.t()  # [V, H]
        features_t = w_f.t()  # [H, H]
        terms = self._padrec_terms() if self.padrec is not None else _PadRecTerms(None, None, None, None)
        if terms.item_table is not None:
            base = base + terms.item_table.float()
        step_vecs = None
        if terms.w_u is not None:  # gate: logit column, per-step constant inside
            w_u = terms.w_u.float()  # [1, H]
            logit = base @ w_u.t()  # [V, 1]
            # the logit column, then zero columns up to a multiple of 16 (an odd width slows the matmul)
            pad = -(h + 1) % 16
            tokens = [F.pad(torch.cat((base, logit + c.float()), 1), (0, pad)) for c in terms.step_logits]  # [V, H']
            features_t = F.pad(torch.cat((features_t, features_t @ w_u.t()), 1), (0, pad))  # [H, H']
            step_vecs = terms.step_vecs
        elif terms.step_vecs is not None:  # no gate: s_k is a constant of step k
            tokens = [base + s.float() for s in terms.step_vecs]
        else:  # eagle, padrec without step embedding: one table for every step
            tokens = [base] * steps
        dtype = self.fc.weight.dtype
        self._tables = _DecodeTables(tuple(t.to(dtype).contiguous() for t in tokens),
                                     features_t.to(dtype).contiguous(), step_vecs)
        self._tables_key = key
        return self._tables

    def _padrec_terms(self) -> _PadRecTerms:
        """The parameter-only part of the PAD-Rec terms.

        Recomputed on every call while autograd records (training); cached otherwise, keyed on the
        parameters' storage and version counters, so an optimizer step, ``load_state_dict`` or
        ``.to()`` invalidates it (parameters created under ``torch.inference_mode`` have no
        version counter and are never cached).
        """
        p, cfg = self.padrec, self.config
        key = _param_key(self._folded_parameters())  # fc too: a superset, still exact
        if key is not None and self._terms_key == key:
            return self._terms
        item_table = step_vecs = step_logits = w_u = None
        if cfg.has_item_emb:
            item_table = p.alpha * p.item_emb.weight[self.slot_of_token]  # [V, H]
        if cfg.has_step_emb:
            step_vecs = p.step_emb.weight.unbind(0)  # K+1 x [H]
            if cfg.has_gate:
                w_u, w_s = p.gate.weight.split(cfg.hidden_size, dim=1)  # [1, H] each
                step_logits = F.linear(p.step_emb.weight, w_s, p.gate.bias).split(1)  # K+1 x [1]
        terms = _PadRecTerms(item_table, step_vecs, step_logits, w_u)
        if key is not None:
            self._terms_key, self._terms = key, terms
        return terms

    def logits(self, hidden: torch.Tensor, lm_head: nn.Module) -> torch.Tensor:
        """hidden [..., H] -> logits [..., V] through the target's ``lm_head`` (or the head's own
        copy of it, ``draft_lm_head``, when ``int8_linear.quantize_head`` made one)."""
        return (lm_head if self.draft_lm_head is None else self.draft_lm_head)(hidden)
