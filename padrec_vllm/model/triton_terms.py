"""The PAD-Rec terms of a gated head with item embeddings as one Triton kernel (CUDA inference).

``add_padrec_terms`` (``model.padrec_terms``) runs a gather, an add, a [B, T, H] x [H] dot with
bias, a sigmoid and an addcmul: six small kernels per draft step. This module runs them as one,
in float32 inside, rounding once to u's dtype at the end. Imported only by a ``DecodingHead`` on
CUDA (Triton ships with PyTorch's CUDA builds); no autograd.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from padrec_vllm.model.padrec_terms import PadRecTerms


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


def fused_padrec_terms(
    u: torch.Tensor, input_ids: torch.Tensor, terms: PadRecTerms, k: int
) -> torch.Tensor:
    """``add_padrec_terms(u, input_ids, terms, k)`` in one kernel: u [B, T, H] on CUDA,
    input_ids [B, T]; ``terms`` must hold the item table and the gate."""
    if terms.item_table is None or terms.w_u is None:
        raise ValueError("the fused kernel needs the item table and the gate")
    h = u.shape[-1]
    rows = u.reshape(-1, h).contiguous()  # [N, H]
    out = torch.empty_like(rows)  # [N, H]
    _padrec_terms_kernel[(rows.shape[0],)](
        rows, input_ids.reshape(-1).contiguous(), terms.item_table, terms.step_vecs[k],
        terms.w_u, terms.step_logits[k], out, h, BLOCK=triton.next_power_of_2(h),
    )
    return out.view_as(u)  # [B, T, H]
