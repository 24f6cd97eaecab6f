"""Linear layers for CPU decoding, where a forward sees only a few rows (tokens x batch).

On CPU, ``F.linear`` on a handful of rows goes through a GEMM that packs the weight first.
Multiplying the other way round, ``W @ x^T``, streams the weight as it lies, which was the faster
of the two for a few rows on small CPU machines with cold caches (``scripts/draft_costs.py``
measures a verify forward by width; docs/RESULTS.md). Same math, so outputs match ``F.linear`` up
to float rounding.

A single row is the worst case: every formulation of a one-row product (``F.linear``, ``mv``,
``W @ x^T``) ran slower than a two-row ``W @ x^T``. So one row is padded with a zero row and the
product's first column kept: a plain decoding step (and a one-token draft step) gets the two-row
speed.

``use_skinny_linears(model)`` turns every plain ``nn.Linear`` of a model into a ``SkinnyLinear``
in place (same parameters and state dict). Training, other devices and wide inputs keep
``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 16  # up to this many rows take the W @ x^T path


class SkinnyLinear(nn.Linear):
    """``nn.Linear`` whose CPU inference on at most ``MAX_ROWS`` rows computes ``(W @ x^T)^T``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        plain = (x.device.type != "cpu" or rows > MAX_ROWS or rows == 0
                 or torch.is_grad_enabled() or x.dtype != self.weight.dtype)
        if plain:
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])  # [N, in]
        if rows == 1:
            flat = F.pad(flat, (0, 0, 0, 1))  # [2, in]: a zero row (module docstring)
        out = torch.mm(self.weight, flat.t()).t()[:rows]  # [N, out]
        if self.bias is not None:
            out = out + self.bias
        return out.contiguous().view(*x.shape[:-1], self.out_features)  # [..., out]


def use_skinny_linears(model: nn.Module) -> int:
    """Turn every exact ``nn.Linear`` under ``model`` into a ``SkinnyLinear`` in place; returns how
    many. Parameters, buffers and the state dict are untouched."""
    count = 0
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = SkinnyLinear
            count += 1
    return count
