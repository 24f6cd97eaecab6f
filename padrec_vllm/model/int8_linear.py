"""Int8 linear layers for CPU drafting (``decoding_head(..., int8=True)`` builds them).

Weights symmetric int8 with one scale per output channel; activations quantized on the fly per
call (``torch.ops.quantized.linear_dynamic``, fbgemm), so a layer reads a quarter of the bytes
of its float32 weights. The matrices are packed once, at construction: later changes of the
source ``nn.Linear`` are not seen.

Without AVX-512 VNNI, fbgemm multiplies uint8 activations by int8 weights with ``vpmaddubsw``,
which saturates the int16 sum of each pair of products: with full-range weights the outputs can
be far off (a relative error of 18% was seen on an AVX2 CPU). There the weights take 7 bits,
[-63, 63], so that two products of at most 255 x 63 cannot saturate; with VNNI (int32
accumulation) they take [-127, 127]. Activations always keep 8 bits.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import torch
from torch import nn


@functools.cache
def fbgemm_needs_reduce_range() -> bool:
    """True (weights in 7 bits) unless the CPU has AVX-512 VNNI (read from /proc/cpuinfo; True
    when unreadable)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return "avx512_vnni" not in flags


class Int8Linear(nn.Module):
    """Inference-only ``nn.Linear`` with int8 per-output-channel weights, CPU only.

    forward: x [..., in] float32 -> [..., out] float32, the activations quantized per call.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float().cpu()  # [out, in]
        self.reduce_range = fbgemm_needs_reduce_range()
        levels = 63.0 if self.reduce_range else 127.0  # weights in [-levels, levels]
        scale = (w.abs().amax(dim=1) / levels).clamp(min=1e-12)  # [out]
        zero = torch.zeros(w.shape[0], dtype=torch.long)  # [out]
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        with warnings.catch_warnings():  # quantized tensor creation warns of a future deprecation
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        try:
            self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        except RuntimeError as e:
            raise ValueError(f"this PyTorch build cannot run int8 linears on CPU ({e})") from e
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("Int8Linear runs on CPU only")
        flat = x.reshape(-1, self.in_features).float()  # [N, in]
        out = torch.ops.quantized.linear_dynamic(flat, self._packed)  # [N, out]
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        bits = 7 if self.reduce_range else 8
        return (f"in_features={self.in_features}, out_features={self.out_features}, int8, "
                f"{bits}-bit weights")
