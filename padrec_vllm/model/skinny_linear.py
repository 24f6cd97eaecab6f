"""Linear layers for CPU decoding, where a forward sees only a few rows (tokens x batch).

On CPU, ``F.linear`` on a handful of rows goes through a GEMM that packs the weight first.
Multiplying the other way round, ``W @ x^T``, streams the weight as it lies. For a single row
that was the faster of the two on small CPU machines with cold caches, padded with a zero row:
every formulation of a one-row product (``F.linear``, ``mv``, ``W @ x^T``) ran slower than a
two-row ``W @ x^T``. So one row is padded with a zero row and the product's first column kept:
a plain decoding step (and a one-token draft step) gets the two-row speed. Same math, so outputs
match ``F.linear`` up to float rounding.

Two or more rows (a verify forward of a few tokens, a batch) take ``F.linear``: on the 2-core
Xeon (AVX-512) machine of docs/RESULTS.md's constrained section, ``W @ x^T`` on 2..16 rows cost
up to twice ``F.linear``, in a verify forward of both the demo (4 x 128) and the bench (8 x 384)
target shapes (a 9-token verify forward of the demo target: 2.3-2.5 ms against 2.0 ms; of the bench
shape, with the caches flushed before each: 16.5 ms against 12.7 ms); ``MAX_ROWS`` is the
switch.

``use_skinny_linears(model)`` turns every plain ``nn.Linear`` of a model into a ``SkinnyLinear``
in place (same parameters and state dict). Training, other devices and wide inputs keep
``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

MAX_ROWS = 1  # up to this many rows take the W @ x^T path (module docstring)


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
