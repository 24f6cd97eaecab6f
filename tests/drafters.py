"""A fake drafter whose behaviour is known exactly, for the engine's chain and tree tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tiny_models import LAYOUT


class HistoryCache:
    """Per row and position p, the token x_{p+1} the drafter was fed (position-addressed)."""

    def __init__(self, batch_size: int, capacity: int) -> None:
        self.tokens = torch.full((batch_size, capacity), -1, dtype=torch.long)  # [B, S]

    def select(self, rows: torch.Tensor) -> None:
        self.tokens = self.tokens[rows]

    def tree_scratch(self, size: int) -> HistoryScratch:
        return HistoryScratch(torch.full((self.tokens.shape[0], size), -1, dtype=torch.long))


@dataclass(frozen=True)
class HistoryScratch:
    """Tree-node scratch: this fake keeps token ids where a head keeps keys."""

    tokens: torch.Tensor  # [B, M]

    def at(self, slots, visible, prefix_end) -> HistoryTree:
        return HistoryTree(self.tokens, slots, visible, prefix_end)


@dataclass(frozen=True)
class HistoryTree:
    """A call's place in the tree (``protocol.TreeScratch.at``)."""

    tokens: torch.Tensor  # [B, M]: the scratch, written in place
    slots: torch.Tensor  # [T]
    visible: torch.Tensor  # [B, T, M]
    prefix_end: torch.Tensor  # [B]


class TableDrafter:
    """Drafts from known greedy outputs: history x_1..x_{p+1} -> x_{p+2}, in chains and trees.

    mode "oracle" proposes the target's own token, "wrong" never does, "noisy" is wrong whenever
    the history's token sum is a multiple of 3 (so rows accept different, partial counts),
    "hedged" is "noisy" with a confidence that tells (its logits give the right tokens
    probability ~1 and the wrong ones ~1/V), and "runner-up" always ranks the right token second
    (probability ~0.27, the wrong one ~0.73). In a tree call the history is the verified prefix
    plus the node's ancestors, read back from the scratch. Its "features" are the logits;
    ``logits`` passes them through.
    """

    def __init__(self, prompts, completions, mode: str, num_steps: int = 3) -> None:
        self.next: dict[tuple[int, ...], int] = {}
        for p, c in zip(prompts, completions):
            seq = p + c
            for i in range(2, len(seq)):
                self.next[tuple(seq[1:i])] = seq[i]
        self.mode, self.num_steps, self.steps = mode, num_steps, []

    def new_cache(self, batch_size: int, capacity: int) -> HistoryCache:
        return HistoryCache(batch_size, capacity)

    def __call__(self, input_ids, features, position_ids, *, step, embed, cache, tree=None):
        self.steps.append(step)
        b, t = input_ids.shape
        if tree is None:
            cache.tokens[torch.arange(b)[:, None], position_ids] = input_ids
        else:
            tree.tokens[:, tree.slots] = input_ids
        out = torch.zeros(b, t, LAYOUT.vocab_size)
        for r in range(b):
            for i in range(t):
                if tree is None:
                    history = cache.tokens[r, : int(position_ids[r, i]) + 1].tolist()
                else:
                    history = (cache.tokens[r, : int(tree.prefix_end[r])].tolist()
                               + tree.tokens[r][tree.visible[r, i]].tolist())
                right = self.next.get(tuple(history), 0)
                wrong = (right + 1) % LAYOUT.vocab_size
                noisy = self.mode in ("noisy", "hedged") and sum(history) % 3 == 0
                if self.mode == "runner-up":
                    out[r, i, wrong], out[r, i, right] = 10.0, 9.0
                elif self.mode == "wrong" or noisy:
                    out[r, i, wrong] = 1.0
                else:
                    out[r, i, right] = 50.0 if self.mode == "hedged" else 1.0
        return out

    def logits(self, hidden, lm_head):
        return hidden
