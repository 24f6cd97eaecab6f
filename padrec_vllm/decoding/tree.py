"""Tree speculative decoding, as pure functions: draft a tree of candidates, verify it in one
target forward, keep the longest path the target agrees with.

Why: on semantic-ID lists the head's first guess for the first code of the next item is right
about a quarter of the time, but the right code is among its top few far more often
(``scripts/head_topk.py``); verifying a handful of alternatives costs about as much as one token
on a small target. A tree spends the verify forward's spare width on those alternatives.

Drafting (the EAGLE-2 dynamic tree): step 1 is the chain's pass over the verified inputs; its
``top_k`` most likely tokens are the depth-1 nodes. Each later step runs the head on the
``top_k`` nodes of the previous depth with the best scores (score = summed log-probability of the
path), in one call, and scores each one's ``top_k`` children. After ``depth`` steps the ``nodes``
best-scored candidates of every depth form the tree; a child never scores above its parent, so
the tree is connected. A node at depth d is read by the head as step d + 1 (its step embedding),
at position root + d, attending to the verified prefix and its own ancestors (placed there
through the drafter protocol: ``protocol.TreeDrafter``).

Verifying: the target reads [x_n, node_1..node_N] with the tree mask (each input sees the prefix,
its ancestors and itself) at position next + depth, and gives its greedy token after every
input. A node is accepted when its token is the target's choice after its parent and its parent
is accepted; siblings hold different tokens, so the accepted nodes form one path. The round emits
that path's tokens and the target's token after its last node, as plain greedy decoding would.

Under the catalog constraint ``decoding.constrained_tree`` grows the tree itself (each node's
children are the head's top-k *legal* tokens, a forced position gets its one token, K counts
choices) and reuses ``_select``, ``accept_tree`` and ``path_indices`` from here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from padrec_vllm.decoding.protocol import TreeDraftCache, TreeDrafter


@dataclass(frozen=True)
class TreeSpec:
    """Shape of the draft tree: at most ``nodes`` draft tokens verified per round, ``top_k``
    children scored per expanded node (and nodes expanded per depth). The depth is the engine's K.

    ``min_prob`` trims the tree per row and round: past the K best nodes (as many as a chain
    verifies) a node is kept only if the head gives its whole path probability >= ``min_prob``.
    A verify forward costs about the same up to K + 1 tokens on a CPU and more per token after
    that, so confident rounds verify a chain's width and doubtful ones the full tree.
    """

    nodes: int
    top_k: int = 4
    min_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.nodes < 1 or self.top_k < 1:
            raise ValueError(
                f"tree needs nodes >= 1 and top_k >= 1, got {self.nodes}, {self.top_k}"
            )
        if not 0.0 <= self.min_prob < 1.0:
            raise ValueError(f"tree min_prob must be in [0, 1), got {self.min_prob}")


class DraftTree(NamedTuple):
    """One round's tree for every row. Block index 0 is the root x_n, i + 1 is node i; nodes are
    ordered so that a parent comes before its children. Rows trimmed by ``min_prob`` are padded
    to the widest row with invalid nodes: children of the root that nothing sees, never accepted."""

    tokens: torch.Tensor  # [B, N] node tokens
    parents: torch.Tensor  # [B, N] block index of each node's parent (0 = root)
    depths: torch.Tensor  # [B, N] 1..K
    mask: torch.Tensor  # [B, N+1, N+1] bool: block input i sees block input j (ancestor or self)
    valid: torch.Tensor  # [B, N] bool: a real node (not padding)
    head_steps: int
    source: torch.Tensor | None = None  # [B, N]: each node's index in the candidate pool


def draft_tree(
    head: TreeDrafter,
    embed: nn.Module,
    lm_head: nn.Module,
    cache: TreeDraftCache,
    input_ids: torch.Tensor,
    features: torch.Tensor,
    position_ids: torch.Tensor,
    counts: torch.Tensor,
    depth: int,
    spec: TreeSpec,
) -> DraftTree:
    """Draft a tree of ``min(spec.nodes, candidates)`` nodes, at most ``depth`` deep.

    input_ids [B, T] (x_{p+1}), features [B, T, H] (f_p), position_ids [B, T] (p), counts [B]:
    the pending verified inputs, as for ``speculative.draft_chain``. ``head`` must be a
    ``TreeDrafter``.
    """
    b = input_ids.shape[0]
    rows = torch.arange(b, device=input_ids.device)  # [B]
    last = counts - 1  # [B]
    hidden = head(input_ids, features, position_ids, step=1, embed=embed, cache=cache)  # [B, T, H]
    h_root = hidden[rows, last][:, None]  # [B, 1, H]
    root_pos = position_ids[rows, last]  # [B]
    logp = head.logits(h_root, lm_head)[:, 0].float().log_softmax(-1)  # [B, V]
    k = min(spec.top_k, logp.shape[-1])
    score, tok = logp.topk(k, dim=-1)  # [B, k] each
    pool_tok, pool_score = [tok], [score]
    pool_parent = [torch.full_like(tok, -1)]  # pool index of the parent, -1 = root
    pool_depth = [torch.ones_like(tok)]
    frontier = torch.arange(k, device=tok.device).expand(b, k)  # [B, k] pool indices
    # the frontier: tokens [B, k], path scores [B, k], input features [B, k, H]
    f_tok, f_score, f_feat = tok, score, h_root.expand(b, k, h_root.shape[-1])
    scratch = k * max(depth - 1, 0)
    nodes = cache.tree_scratch(scratch)  # M = scratch entries per row
    f_anc = torch.zeros(b, k, scratch, dtype=torch.bool, device=tok.device)  # [B, k, M]
    size = k
    for d in range(2, depth + 1):
        slots = torch.arange((d - 2) * k, (d - 1) * k, device=tok.device)  # [k]
        visible = f_anc.clone()
        visible[:, torch.arange(k, device=tok.device), slots] = True  # [B, k, M]
        tree = nodes.at(slots, visible, root_pos + 1)
        pos = (root_pos + d - 1)[:, None].expand(b, k)  # [B, k]
        h = head(f_tok, f_feat, pos, step=d, embed=embed, cache=cache, tree=tree)  # [B, k, H]
        logp = head.logits(h, lm_head).float().log_softmax(-1)  # [B, k, V]
        c_score, c_tok = logp.topk(k, dim=-1)  # [B, k, k] each
        c_score = (f_score[:, :, None] + c_score).flatten(1)  # [B, k*k]
        c_tok = c_tok.flatten(1)  # [B, k*k]
        pool_tok.append(c_tok)
        pool_score.append(c_score)
        pool_parent.append(frontier[:, :, None].expand(b, k, k).flatten(1))
        pool_depth.append(torch.full_like(c_tok, d))
        f_score, best = c_score.topk(k, dim=-1)  # [B, k] each
        parent = best // k  # [B, k]: which frontier node each new one hangs from
        frontier = size + best
        size += k * k
        f_tok = c_tok.gather(1, best)  # [B, k]
        f_feat = h.gather(1, parent[..., None].expand(-1, -1, h.shape[-1]))  # [B, k, H]
        f_anc = visible.gather(1, parent[..., None].expand(-1, -1, scratch))  # [B, k, M]
    return _select(torch.cat(pool_tok, 1), torch.cat(pool_score, 1), torch.cat(pool_parent, 1),
                   torch.cat(pool_depth, 1), spec, depth)


def _select(tok: torch.Tensor, score: torch.Tensor, parent: torch.Tensor, depth: torch.Tensor,
            spec: TreeSpec, head_steps: int, free: torch.Tensor | None = None,
            sure: int | None = None) -> DraftTree:
    """The best nodes of the candidate pool (tok, score, parent, depth [B, P], parents before
    children) -> DraftTree: ``spec.nodes`` of them, trimmed by ``spec.min_prob`` past the first
    ``sure`` (default ``head_steps``). Ties keep pool order (stable sort), so a parent tied with
    its child is taken first and the tree stays connected (a trimmed node's children score no
    higher, so go too). With ``free`` [B] (the constrained tree, ``decoding.constrained_tree``):
    row r takes ``free[r]`` more nodes, and ``sure`` counts past them (its forced run, which ranks
    first), and a candidate scored -inf (padding) is never taken."""
    b, p = tok.shape
    sure = head_steps if sure is None else sure
    constrained = free is not None
    if free is None:
        free = torch.zeros(b, dtype=torch.long, device=tok.device)
        n = min(spec.nodes, p)
    else:
        n = min(spec.nodes + int(free.max()), p)
    extra = free[:, None]  # [B, 1]
    ranked, best = score.sort(dim=1, descending=True, stable=True)  # [B, P] each
    ranked, best = ranked[:, :n], best[:, :n]  # [B, N]
    rank = torch.arange(n, device=tok.device)  # [N]
    keep = torch.ones_like(best, dtype=torch.bool)  # [B, N] in rank order
    if constrained:
        keep = (ranked > float("-inf")) & (rank < spec.nodes + extra)
    if spec.min_prob > 0:
        keep &= (ranked >= math.log(spec.min_prob)) | (rank < sure + extra)
    if constrained or spec.min_prob > 0:  # keep is a prefix of each row's ranking
        n = int(keep.sum(dim=1).max())
        ranked, best, keep = ranked[:, :n], best[:, :n], keep[:, :n]
    # pool order puts parents first; a dropped node sorts last
    sel = torch.where(keep, best, p + best).sort(dim=1).values  # [B, N]
    valid = sel < p  # [B, N]
    sel = torch.where(valid, sel, sel - p)
    block_of = torch.zeros(b, p, dtype=torch.long, device=tok.device)  # [B, P] pool -> block index
    block_of.scatter_(1, sel, torch.arange(1, n + 1, device=tok.device).expand(b, n))
    par = torch.where(valid, parent.gather(1, sel), -1)  # [B, N]: padding hangs from the root
    parents = torch.where(par < 0, 0, block_of.gather(1, par.clamp(min=0)))  # [B, N]
    mask = torch.eye(n + 1, dtype=torch.bool, device=tok.device).repeat(b, 1, 1)  # [B, N+1, N+1]
    rows = torch.arange(b, device=tok.device)  # [B]
    for i in range(1, n + 1):
        mask[:, i] |= mask[rows, parents[:, i - 1]]
    depths = torch.where(valid, depth.gather(1, sel), 1)  # [B, N]
    return DraftTree(tok.gather(1, sel), parents, depths, mask, valid, head_steps, sel)


def accept_tree(tree: DraftTree, verified: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Deepest node on the path the target agrees with -> (accepted [B], leaf [B]).

    ``verified`` [B, N+1]: the target's greedy token after each block input. ``accepted`` is the
    path's length (0: no draft kept), ``leaf`` its last block index (0: the root).
    """
    match = (tree.tokens == verified.gather(1, tree.parents)) & tree.valid  # [B, N]
    ok = torch.cat((torch.ones_like(match[:, :1]), match), dim=1)  # [B, N+1]
    on_path = ~(tree.mask & ~ok[:, None, :]).any(dim=-1)  # [B, N+1]: every ancestor agrees
    depths = torch.cat((torch.zeros_like(tree.depths[:, :1]), tree.depths), dim=1)  # [B, N+1]
    return torch.where(on_path, depths, -1).max(dim=1)  # [B], [B]


def path_indices(tree: DraftTree, leaf: torch.Tensor, width: int) -> torch.Tensor:
    """Block indices of the root-to-``leaf`` path in depth order, right-padded to ``width``
    (padding repeats the last index) -> [B, width]."""
    rows = torch.arange(leaf.shape[0], device=leaf.device)  # [B]
    kept = tree.mask[rows, leaf]  # [B, N+1]
    t = kept.shape[1]
    order = torch.where(kept, torch.arange(t, device=leaf.device), t)  # [B, N+1]
    if t < width:
        pad = order.new_full((order.shape[0], width - t), t)  # [B, width - N - 1]
        order = torch.cat((order, pad), dim=1)  # [B, width]
    path = order.sort(dim=1).values[:, :width]  # [B, width]
    last = path.gather(1, (kept.sum(1, keepdim=True) - 1).clamp(max=width - 1))  # [B, 1]
    return torch.where(path < t, path, last)
