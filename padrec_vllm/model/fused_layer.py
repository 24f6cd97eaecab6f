"""The head's decoder layer for CPU decoding with a cache, in as few tensor ops as the math allows.

A draft step runs one layer on a handful of rows, so on CPU its time is the number of ops (each
costs microseconds of dispatch whatever its size), not their arithmetic. ``FusedLayer`` is a
snapshot of a float ``DecoderLayer`` (``fused_layer(layer, rope)``) that computes the same math
(``DecoderLayer.forward`` with a ``HeadCache``, no tree) up to float rounding, with:

- one matmul for q, k, v and RoPE's rotated halves: ``x @ [W_q | W_k | W_q R | W_k R | W_v]^T``,
  where R is ``rotate_half`` as a signed permutation of each head's D columns, so RoPE is
  ``qk * cos + qk_rot * sin`` over the q and k heads at once (cos, sin tiled per head);
- attention over the cache's slots up to the call's highest position only, without a mask when
  one query per row reads every one of them (batch 1, one token); at batch 1, whose positions
  are consecutive in every decoding call, RoPE rows, cache slots and the causal mask are plain
  slices (of the tables and of a precomputed [S, S] causal mask);
- ``addmm`` for the output projections with their residuals, ``rms_norm`` in one op, one matmul
  for the MLP's gate and up projections;
- weights stored transposed ([in, out]): a few-row ``x @ W^T`` then streams them as they lie.

Inference only; the snapshot does not follow later changes of the layer's parameters.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from padrec_vllm.model.head_cache import HeadCache


class FusedLayer(NamedTuple):
    qkv_t: torch.Tensor  # [H, 2 * QK + KV]: q | k | rot(q) | rot(k) | v, QK = (Hq + Hkv) * D
    o_t: torch.Tensor  # [Hq * D, H]
    norm_weight: torch.Tensor  # [H]
    eps: float
    gate_up_t: torch.Tensor  # [H, 2 * I]
    down_t: torch.Tensor  # [I, H]
    cos: torch.Tensor  # [S, QK]: the RoPE table tiled over the q and k heads
    sin: torch.Tensor  # [S, QK]
    causal: torch.Tensor  # [S, S] bool: slot j is visible from position i (j <= i)
    num_heads: int
    num_kv_heads: int
    head_dim: int


@torch.no_grad()
def fused_layer(layer: nn.Module, rope: tuple[torch.Tensor, torch.Tensor]) -> FusedLayer:
    """The fused snapshot of a float ``DecoderLayer`` (``model.layers``) with its RoPE table
    ``rope`` (cos, sin [S, D])."""
    attn, mlp = layer.self_attn, layer.mlp
    hq, hkv, d = attn.num_heads, attn.num_kv_heads, attn.head_dim
    half = torch.arange(d // 2)
    rot = torch.zeros(d, d, dtype=attn.q_proj.weight.dtype)  # x @ rot = rotate_half(x)
    rot[half + d // 2, half] = -1.0
    rot[half, half + d // 2] = 1.0

    def rotated(w: torch.Tensor, heads: int) -> torch.Tensor:  # [heads * D, H] -> same, rotated
        return (w.view(heads, d, -1).transpose(1, 2) @ rot).transpose(1, 2).reshape(heads * d, -1)

    wq, wk, wv = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
    qkv = torch.cat((wq, wk, rotated(wq, hq), rotated(wk, hkv), wv))  # [2 QK + KV, H]
    norm = layer.post_attention_layernorm
    cos, sin = rope
    return FusedLayer(
        qkv.t().contiguous(),
        attn.o_proj.weight.t().contiguous(),
        norm.weight.detach().clone(),
        norm.eps,
        torch.cat((mlp.gate_proj.weight, mlp.up_proj.weight)).t().contiguous(),
        mlp.down_proj.weight.t().contiguous(),
        cos.repeat(1, hq + hkv).contiguous(),
        sin.repeat(1, hq + hkv).contiguous(),
        torch.ones(cos.shape[0], cos.shape[0], dtype=torch.bool, device=cos.device).tril(),
        hq, hkv, d,
    )


def fused_forward(f: FusedLayer, u: torch.Tensor, position_ids: torch.Tensor,
                  cache: HeadCache) -> torch.Tensor:
    """``DecoderLayer.forward`` with ``cache``: u [B, T, H], position_ids [B, T] (below the
    RoPE table's size) -> [B, T, H]. At batch 1 the positions must be consecutive (p, p + 1,
    ...), as a decoding call's are."""
    b, t, h = u.shape
    hq, hkv, d = f.num_heads, f.num_kv_heads, f.head_dim
    qk_w = (hq + hkv) * d
    x = u.reshape(b * t, h)  # [N, H]
    a = x @ f.qkv_t  # [N, 2 QK + KV]
    if b == 1:
        p, last = int(position_ids[0, 0]), int(position_ids[0, -1])
        if last - p != t - 1:
            raise ValueError(f"batch-1 positions must be consecutive, got {p}..{last} for {t}")
        end = last + 1  # keys past the highest query position are never seen
        cos, sin = f.cos[p:end], f.sin[p:end]  # [T, QK]
    else:
        end = int(position_ids.max()) + 1
        cos = F.embedding(position_ids, f.cos).view(b * t, qk_w)  # [N, QK]
        sin = F.embedding(position_ids, f.sin).view(b * t, qk_w)  # [N, QK]
    qk = torch.addcmul(a[:, :qk_w] * cos, a[:, qk_w : 2 * qk_w], sin)  # [N, QK], roped
    q = qk[:, : hq * d].view(b, t, hq, d)  # [B, T, Hq, D]
    k_new, v_new = qk[:, hq * d :].view(b, t, hkv, d), a[:, 2 * qk_w :].view(b, t, hkv, d)
    if b == 1:
        cache.keys[:, p:end] = k_new
        cache.values[:, p:end] = v_new
        mask = f.causal[p:end, :end] if t > 1 else None  # [T, S']
    else:  # each query sees the slots up to its own position
        cache.write(k_new, v_new, position_ids)
        slots = torch.arange(end, device=u.device)  # [S']
        mask = (slots <= position_ids[:, :, None])[:, None]  # [B, 1, T, S']
    k = cache.keys[:, :end].transpose(1, 2)  # [B, Hkv, S', D]
    v = cache.values[:, :end].transpose(1, 2)  # [B, Hkv, S', D]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v, attn_mask=mask,
                                         enable_gqa=hq != hkv)  # [B, Hq, T, D]
    r = torch.addmm(x, out.transpose(1, 2).reshape(b * t, hq * d), f.o_t)  # [N, H]
    gu = F.rms_norm(r, (h,), f.norm_weight, f.eps) @ f.gate_up_t  # [N, 2 I]
    i = gu.shape[1] // 2
    return torch.addmm(r, F.silu(gu[:, :i]) * gu[:, i:], f.down_t).view(b, t, h)  # [B, T, H]


def fused_step(f: FusedLayer, u: torch.Tensor, p: int, cache: HeadCache) -> torch.Tensor:
    """``fused_forward`` of one query (batch 1) at position ``p``: u [1, H] -> [1, H]. The
    position is a Python int, so RoPE, the cache write and the keys are plain slices."""
    h = u.shape[1]
    hq, hkv, d = f.num_heads, f.num_kv_heads, f.head_dim
    qk_w = (hq + hkv) * d
    a = u @ f.qkv_t  # [1, 2 QK + KV]
    qk = torch.addcmul(a[:, :qk_w] * f.cos[p], a[:, qk_w : 2 * qk_w], f.sin[p])  # [1, QK]
    cache.keys[0, p] = qk[0, hq * d :].view(hkv, d)
    cache.values[0, p] = a[0, 2 * qk_w :].view(hkv, d)
    k = cache.keys[:, : p + 1].transpose(1, 2)  # [1, Hkv, p + 1, D]
    v = cache.values[:, : p + 1].transpose(1, 2)  # [1, Hkv, p + 1, D]
    q = qk[:, : hq * d].view(1, hq, 1, d)  # [1, Hq, 1, D]
    out = F.scaled_dot_product_attention(q, k, v, enable_gqa=hq != hkv)  # [1, Hq, 1, D]
    r = torch.addmm(u, out.view(1, hq * d), f.o_t)  # [1, H]
    gu = F.rms_norm(r, (h,), f.norm_weight, f.eps) @ f.gate_up_t  # [1, 2 I]
    i = gu.shape[1] // 2
    return torch.addmm(r, F.silu(gu[:, :i]) * gu[:, i:], f.down_t)  # [1, H]
