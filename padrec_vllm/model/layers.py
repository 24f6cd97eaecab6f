"""The EAGLE-1 decoder layer: a Llama layer without ``input_layernorm``, and its parts.

Follows vLLM 0.32 ``vllm/model_executor/models/llama_eagle.py`` (and Hugging Face's
``LlamaDecoderLayer``) tensor for tensor: default RoPE (HF Llama = vLLM neox), grouped-query
attention, RMSNorm with float32 statistics, SwiGLU MLP, no biases.

Attention reads one of three key sets: none cached (training: causal over the call's T inputs,
optionally hiding padding keys), a ``HeadCache`` (decoding: the call's keys are written at its
positions, each query sees the slots up to its own position), or a ``HeadCache`` plus a
``TreeAttention`` (tree drafting: the verified prefix plus the query's tree ancestors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from padrec_vllm.model.config import HeadConfig
from padrec_vllm.model.head_cache import HeadCache, TreeAttention


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


def rope_table(
    size: int, head_dim: int, theta: float, dtype: torch.dtype, device: torch.device | str
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rope_cos_sin`` of positions 0..size-1 -> cos, sin [size, D]: row p equals the value
    ``rope_cos_sin`` gives for position p, so a lookup replaces the computation."""
    every = torch.arange(size, device=device)[None]  # [1, S]
    cos, sin = rope_cos_sin(every, head_dim, theta, dtype)  # [1, S, D] each
    return cos[0], sin[0]  # [S, D] each


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

    def forward(
        self,
        u: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        position_ids: torch.Tensor,
        cache: HeadCache | None,
        attention_mask: torch.Tensor | None,
        tree: TreeAttention | None = None,
    ) -> torch.Tensor:
        """u [B, T, H] (the layer input), cos/sin [B, T, D], position_ids [B, T] -> [B, T, H]."""
        r = u + self.self_attn(u, cos, sin, position_ids, cache, attention_mask, tree)  # [B, T, H]
        return r + self.mlp(self.post_attention_layernorm(r))  # [B, T, H]
