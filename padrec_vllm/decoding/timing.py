"""Phase clocks of the reference engine: what ``accounting``'s times are made of."""

from __future__ import annotations

import time

import torch

from padrec_vllm.decoding.accounting import RequestAccounting


def clock(device: torch.device) -> float:
    """Seconds, after the device has finished the work queued so far."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def charge(rows: list[RequestAccounting], alive: list[int], phase: str, seconds: float) -> None:
    """Split a batch-level phase time evenly among the rows that took part. ``phase`` is
    "prefill", "draft" (part of decoding) or "verify" (the rest of decoding)."""
    share = seconds / len(alive)
    for i in alive:
        row = rows[i]
        if phase == "prefill":
            row.prefill_s += share
        else:
            row.decode_s += share
            row.draft_s += share if phase == "draft" else 0.0
