"""Mixed precision for training: bfloat16 autocast where the device runs it natively.

CUDA always takes bfloat16 autocast. A CPU takes it only when oneDNN reports native bfloat16
(AVX-512 BF16 / AMX class CPUs); elsewhere (an AVX2-only CPU, for one) PyTorch's CPU GEMM falls
back to a scalar bfloat16 kernel that is many times slower than float32, so training stays in
float32 there. ``PADREC_TRAIN_BF16`` (``1`` / ``0``) overrides the choice on a CPU.
"""

from __future__ import annotations

import contextlib
import os

import torch

OVERRIDE_ENV = "PADREC_TRAIN_BF16"


def cpu_has_native_bf16() -> bool:
    """True when oneDNN reports bfloat16 support on this CPU (False if it cannot tell)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(device: str) -> bool:
    """Whether training on ``device`` ("cpu", "cuda", "cuda:N") autocasts to bfloat16."""
    if device.startswith("cuda"):
        return True
    override = os.environ.get(OVERRIDE_ENV, "").strip()
    if override in ("0", "1"):
        return override == "1"
    return cpu_has_native_bf16()


def autocast(device: str) -> contextlib.AbstractContextManager:
    """The forward pass's context: bfloat16 autocast when ``use_bf16(device)``, else a no-op."""
    if not use_bf16(device):
        return contextlib.nullcontext()
    device_type = "cuda" if device.startswith("cuda") else "cpu"
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
