"""One round of chain speculative decoding, as pure functions (docs/DESIGN.md).

Positions: the head's input at position p is (f_p, x_{p+1}) with position id p, as in vLLM.
Step 1 runs over the verified positions the head has not seen yet (with the target's features);
its output at the last of them proposes draft 1. Steps 2..K each run on one position, fed the
previous step's output feature and draft. The target then verifies [x_n, d_1..d_L] in one forward.

Draft length: K (``num_drafts``) by default. With ``min_confidence`` > 0 a row proposes drafts only
while the head's probability for its own draft stays at or above it (the EAGLE-2 observation that
the draft's confidence tracks its acceptance), and the chain stops once every row has stopped. The
target still verifies every proposed draft, so the output stays the target's greedy output; only
the number of head steps and verified positions changes.
"""

from __future__ import annotations

import torch
from torch import nn

from padrec_vllm.decoding.protocol import DraftCache, Drafter


def draft_chain(
    head: Drafter,
    embed: nn.Module,
    lm_head: nn.Module,
    cache: DraftCache,
    input_ids: torch.Tensor,
    features: torch.Tensor,
    position_ids: torch.Tensor,
    counts: torch.Tensor,
    num_drafts: int,
    min_confidence: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy chain of up to ``num_drafts`` drafts -> (drafts [B, L], proposed [B]).

    input_ids [B, T] (x_{p+1}), features [B, T, H] (f_p), position_ids [B, T] (p): the pending
    verified inputs, right-padded; ``counts`` [B] real inputs per row (>= 1). L (1..K) is the
    number of head steps run; row r proposes its first ``proposed[r]`` (0..L) drafts, those whose
    softmax probability, and every earlier one's, is >= ``min_confidence``. With
    ``min_confidence`` 0, L = K and every row proposes all K.
    """
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # [B]
    last = counts - 1  # [B]
    hidden = head(input_ids, features, position_ids, step=1, embed=embed, cache=cache)  # [B, T, H]
    h = hidden[rows, last][:, None]  # [B, 1, H]
    pos = position_ids[rows, last][:, None]  # [B, 1]
    gated = min_confidence > 0
    logits = head.logits(h, lm_head)  # [B, 1, V]
    drafts = [logits.argmax(-1)]  # [B, 1] each
    live = _confident(logits, min_confidence) if gated else None  # [B]: still proposing
    proposed = live.long() if gated else None  # [B]
    for step in range(2, num_drafts + 1):
        if gated and not bool(live.any()):
            break
        pos = pos + 1  # [B, 1]
        h = head(drafts[-1], h, pos, step=step, embed=embed, cache=cache)  # [B, 1, H]
        logits = head.logits(h, lm_head)  # [B, 1, V]
        drafts.append(logits.argmax(-1))
        if gated:
            live = live & _confident(logits, min_confidence)
            proposed = proposed + live.long()
    if proposed is None:
        proposed = torch.full_like(rows, num_drafts)
    return torch.cat(drafts, dim=1), proposed  # [B, L], [B]


def _confident(logits: torch.Tensor, min_confidence: float) -> torch.Tensor:
    """logits [B, 1, V] -> [B]: the greedy token's softmax probability is >= ``min_confidence``."""
    return logits[:, 0].float().softmax(-1).amax(-1) >= min_confidence


def accepted_prefix(drafts: torch.Tensor, target_tokens: torch.Tensor,
                    proposed: torch.Tensor | None = None) -> torch.Tensor:
    """Longest prefix of drafts [B, K] that agrees with the target's greedy tokens [B, K+1] -> [B],
    at most ``proposed`` [B] long (default: K).

    ``target_tokens[:, j]`` is the target's choice after [x_n, d_1..d_j]; a round emits
    ``target_tokens[:, :a+1]`` (the accepted drafts, then the target's own next token).
    """
    agree = drafts == target_tokens[:, :-1]  # [B, K]
    if proposed is not None:
        agree &= torch.arange(drafts.shape[1], device=drafts.device) < proposed[:, None]  # [B, K]
    return agree.long().cumprod(dim=1).sum(dim=1)  # [B]
