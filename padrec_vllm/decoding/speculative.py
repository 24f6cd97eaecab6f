"""One round of chain speculative decoding, as pure functions (DESIGN.md section 5).

Positions: the head's input at position p is (f_p, x_{p+1}) with position id p, as in vLLM.
Step 1 runs over the verified positions the head has not seen yet (with the target's features);
its output at the last of them proposes draft 1. Steps 2..K each run on one position, fed the
previous step's output feature and draft. The target then verifies [x_n, d_1..d_K] in one forward.
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
) -> torch.Tensor:
    """Greedy chain of ``num_drafts`` drafts -> [B, K].

    input_ids [B, T] (x_{p+1}), features [B, T, H] (f_p), position_ids [B, T] (p): the pending
    verified inputs, right-padded; ``counts`` [B] real inputs per row (>= 1).
    """
    rows = torch.arange(input_ids.shape[0], device=input_ids.device)  # [B]
    last = counts - 1  # [B]
    hidden = head(input_ids, features, position_ids, step=1, embed=embed, cache=cache)  # [B, T, H]
    h = hidden[rows, last][:, None]  # [B, 1, H]
    pos = position_ids[rows, last][:, None]  # [B, 1]
    tok = head.logits(h, lm_head).argmax(-1)  # [B, 1]
    drafts = [tok]
    for step in range(2, num_drafts + 1):
        pos = pos + 1  # [B, 1]
        h = head(tok, h, pos, step=step, embed=embed, cache=cache)  # [B, 1, H]
        tok = head.logits(h, lm_head).argmax(-1)  # [B, 1]
        drafts.append(tok)
    return torch.cat(drafts, dim=1)  # [B, K]


def accepted_prefix(drafts: torch.Tensor, target_tokens: torch.Tensor) -> torch.Tensor:
    """Longest prefix of drafts [B, K] that agrees with the target's greedy tokens [B, K+1] -> [B].

    ``target_tokens[:, j]`` is the target's choice after [x_n, d_1..d_j]; a round emits
    ``target_tokens[:, :a+1]`` (the accepted drafts, then the target's own next token).
    """
    agree = drafts == target_tokens[:, :-1]  # [B, K]
    return agree.long().cumprod(dim=1).sum(dim=1)  # [B]
