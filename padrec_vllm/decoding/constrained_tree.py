"""Tree speculative decoding under the catalog constraint (``decoding.constrained``,
``decoding.tree``): the output is plain constrained greedy's, token for token.

A round starts, as a constrained chain does, from the row's block start ``[x_n, forced...]``: the
target's own token and the forced run after it, already emitted and accepted by the row's
``ListConstraint``. The tree is the EAGLE-2 dynamic tree of ``decoding.tree`` grown from x_n,
with the constraint deciding each node's children:

- a node's children are the head's ``top_k`` most likely *legal* tokens under the state after
  the node's path (the head's logits masked with it, then log-softmax; a node with fewer legal
  tokens than ``top_k`` gets fewer children, an illegal token never becomes a node);
- a node whose next token is forced gets that one child at its own score (probability 1 under
  the masked head), without the head's argmax; it is no choice. So the block start's forced run
  is the tree's first nodes (a chain from x_n at score 0, the highest), and it enters the target
  in the verify forward as in the chain;
- a path holds at most K choices (``num_drafts``, as in the chain); a node after ``<eos>`` has
  no children.

Growing: each level is one block position (x_n = 0). One head call per level (step = position,
at position root + level, in the round's tree scratch as in ``decoding.tree``) runs on the
frontier: per row, the ``top_k`` best-scored new nodes with fewer than K choices (forced ones
included: the head needs its output at every position it continues from). Levels end when no row
has a frontier (at most ``max_levels``). Then, per row, the ``nodes`` best nodes of the pool plus
the block start's forced run (kept, not counted) are taken (``tree._select``; ``min_prob``
applies past the run and the K best); before that, every childless node among them whose next
token is forced gets its forced run appended without the head (``_Pool.complete``: the run after
a path's K-th choice, as the chain appends it, and the run after a node the frontier left out),
so a kept path rarely ends right before a forced token.

Verifying: the target reads [x_n, nodes] under the tree mask, its logits after every input masked
with the legal set after that input's path (a forced node's parent allows only it, so the target
agrees with every forced node). The deepest agreeing path is kept, the row's constraint is moved
to its end, and the round emits the path's tokens past the block start (forced ones flagged) and
the target's own token, after which ``constrained._close`` appends the next forced run as in the
chain. With one child per node and room for every node the tree is the constrained chain.

Per-node legal sets come from the row's one ``ListConstraint``, moved between paths by rolling
back to the common prefix and accepting the rest (``_Walker``); each is computed once
(``_Pool.legal``), only for nodes the frontier or the tree needs.

Accounting: a round's drafts are its choices. ``proposed`` is the most choices on any path of the
tree, ``accepted`` the choices on the kept path; the target's tokens judged are those at the kept
path's choices and its own token when that position is a choice. Kept forced nodes count as
forced tokens; the target's own token never does (it is forced only when the tree was cut right
before a forced token: one forward then chose it, as in plain decoding).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from padrec_vllm.catalog.constraint import ListConstraint, apply_mask, legal_mask
from padrec_vllm.catalog.tokens import PAD_ID
from padrec_vllm.decoding.kv import TargetKV
from padrec_vllm.decoding.protocol import TreeDrafter
from padrec_vllm.decoding.timing import clock
from padrec_vllm.decoding.tree import DraftTree, TreeSpec, _select, accept_tree, path_indices

ROOT = -1  # pool index of x_n


class Pending(NamedTuple):
    """The head's pending inputs (f_p, x_{p+1}) at positions start..start+count-1 of each row:
    the verified positions it has not seen, right-padded (chain and tree rounds alike)."""

    ids: torch.Tensor  # [B, T]
    feats: torch.Tensor  # [B, T, H]
    pos: torch.Tensor  # [B, T]
    counts: list[int]  # per row, at least 1

    def select(self, keep: list[int], sel: torch.Tensor) -> Pending:
        """Rows ``keep`` (as the tensor ``sel``) only."""
        return Pending(self.ids[sel], self.feats[sel], self.pos[sel],
                        [self.counts[i] for i in keep])


class TreeRound(NamedTuple):
    """One constrained tree round, for ``constrained.decode_constrained_batch`` (the fields of
    its chain round)."""

    pending: Pending  # the head's next pending inputs
    # per row: (kept tokens after the forced run, their forced flags, the target's own token,
    #           (choices proposed, choices accepted, the target's tokens at the judged choices))
    rows: list[tuple[list[int], list[bool], int, tuple[int, int, list[int]]]]
    head_steps: int
    drafted_at: float  # clock when drafting ended


def max_levels(num_drafts: int, run: int) -> int:
    """Head levels (block positions) a constrained tree may use: the forced run of the block
    start, then K choices with a forced run between two (``run``: the longest forced run
    assumed, L + 1). Forced runs appended without the head (``_Pool.complete``) hold at most
    ``run`` tokens, so no node lies deeper than ``(K + 1) * (run + 1)``, which the head's cache
    capacity in ``constrained.decode_constrained_batch`` covers. A longer run is cut (the tree
    only ends earlier)."""
    return num_drafts * (run + 1)


class _Walker:
    """One row's constraint state, moved between paths (tokens after x_n): rolled back to the
    common prefix with the path it is at, then the rest accepted."""

    def __init__(self, state: ListConstraint, path: Sequence[int]) -> None:
        """``state`` is after x_n, then ``path``."""
        self.state, self.path = state, list(path)
        self.base = state.checkpoint() - len(self.path)  # the checkpoint after x_n

    def goto(self, path: Sequence[int]) -> ListConstraint:
        c, n = 0, min(len(path), len(self.path))
        while c < n and path[c] == self.path[c]:
            c += 1
        if c < len(self.path):
            self.state.rollback(self.base + c)
            del self.path[c:]
        for tok in path[c:]:
            self.state.accept(tok)
            self.path.append(tok)
        return self.state


class _Pool:
    """One row's candidate nodes in creation order (level by level, so parents come first)."""

    def __init__(self, walker: _Walker) -> None:
        self.walker = walker
        self.tok: list[int] = []
        self.score: list[float] = []
        self.parent: list[int] = []  # pool index, ROOT for x_n's children
        self.depth: list[int] = []  # block position
        self.choice: list[bool] = []  # a choice (its parent had several legal tokens)
        self.choices: list[int] = []  # choices on the path, itself included
        self.path: list[tuple[int, ...]] = []  # tokens after x_n, itself included
        self.src: list[int] = []  # frontier entry of the parent in the call that scored it
        self._legal: dict[int, np.ndarray] = {}

    def add(self, tok: int, score: float, parent: int, choice: bool, src: int) -> int:
        up = parent != ROOT
        self.tok.append(tok)
        self.score.append(score)
        self.parent.append(parent)
        self.depth.append(self.depth[parent] + 1 if up else 1)
        self.choice.append(choice)
        self.choices.append((self.choices[parent] if up else 0) + choice)
        self.path.append((self.path[parent] if up else ()) + (tok,))
        self.src.append(src)
        return len(self.tok) - 1

    def path_of(self, node: int) -> tuple[int, ...]:
        return () if node == ROOT else self.path[node]

    def legal(self, node: int) -> np.ndarray:
        """The legal tokens after ``node``'s path (computed once)."""
        if node not in self._legal:
            self._legal[node] = self.walker.goto(self.path_of(node)).allowed()
        return self._legal[node]

    def choices_of(self, node: int) -> int:
        return 0 if node == ROOT else self.choices[node]

    def score_of(self, node: int) -> float:
        return 0.0 if node == ROOT else self.score[node]

    def expandable(self, node: int, num_drafts: int) -> bool:
        """May join the frontier (children scored with the head's output): fewer than K
        choices, not done."""
        return self.choices_of(node) < num_drafts and len(self.legal(node)) > 0

    def complete(self, budget: int, limit: int) -> None:
        """Append the forced run (at most ``limit`` tokens, as a chain of nodes at the node's
        score, without the head) after every childless node among the ``budget`` best whose next
        token is forced, until there is none. The run ranks right after its node, so the tree
        takes it unless the budget ends between them (the target's own token is then forced)."""
        done = set(self.parent)  # nodes with children
        while True:
            best = sorted(range(len(self.tok)), key=lambda c: -self.score[c])[:budget]
            todo = [c for c in best if c not in done and len(self.legal(c)) == 1]
            if not todo:
                return
            for node in todo:
                done.add(node)
                for tok in self.walker.goto(self.path[node]).forced_run(limit):
                    node = self.add(tok, self.score[node], node, False, -1)
                    done.add(node)  # a run cut at ``limit`` is not extended


def draft_constrained_tree(
    head: TreeDrafter,
    embed: nn.Module,
    lm_head: nn.Module,
    cache,
    pending: Pending,
    pools: list[_Pool],
    num_drafts: int,
    spec: TreeSpec,
    levels: int,
    run: int,
    free: list[int],
) -> tuple[DraftTree, list[list[int]]]:
    """Grow every row's constrained tree from x_n into ``pools`` (module docstring) and select it
    -> (the tree, per row the pool index of each node). ``pending``: the head's verified inputs
    (ids, features, positions, counts), as for ``tree.draft_tree``; ``free[r]``: row r's forced
    run after x_n (its first nodes, kept beyond ``spec.nodes``)."""
    h_ids, h_feats, h_pos, counts = pending
    b, k = len(pools), spec.top_k
    device = h_ids.device
    h_count = torch.as_tensor(counts, device=device)  # [B]
    rows = torch.arange(b, device=device)  # [B]
    hidden = head(h_ids, h_feats, h_pos, step=1, embed=embed, cache=cache)  # [B, T, H]
    h = hidden[rows, h_count - 1][:, None]  # [B, F, H]: head output at each frontier entry
    root_pos = h_pos[rows, h_count - 1]  # [B]: position of the input carrying x_n
    size = k * max(levels - 1, 0)
    scratch = cache.tree_scratch(size)
    anc = torch.zeros(b, 1, size, dtype=torch.bool, device=device)  # [B, F, M]: entries seen
    frontier: list[list[int]] = [[ROOT] for _ in range(b)]
    steps = 1
    for level in range(1, levels + 1):
        # children of the frontier, at block position ``level``
        choosing = [(r, i) for r in range(b) for i, q in enumerate(frontier[r])
                    if len(pools[r].legal(q)) > 1]
        if choosing:
            f = h.shape[1]
            legal = [None] * (b * f)
            for r, i in choosing:
                legal[r * f + i] = pools[r].legal(frontier[r][i])
            logits = head.logits(h, lm_head).float()  # [B, F, V]
            mask = legal_mask(legal, logits.shape[-1], device).view(b, f, -1)  # [B, F, V]
            top_score, top_tok = apply_mask(logits, mask).log_softmax(-1).topk(
                min(k, logits.shape[-1]), dim=-1)  # [B, F, k] each
            top_score, top_tok = top_score.tolist(), top_tok.tolist()
        picked = set(choosing)
        nxt: list[list[int]] = []
        for r, pool in enumerate(pools):
            made = []
            for i, q in enumerate(frontier[r]):
                allowed = pool.legal(q)
                if len(allowed) == 1:
                    made.append(pool.add(int(allowed[0]), pool.score_of(q), q, False, i))
                elif (r, i) in picked:
                    base = pool.score_of(q)
                    for j in range(min(k, len(allowed))):
                        made.append(pool.add(top_tok[r][i][j], base + top_score[r][i][j], q, True,
                                             i))
            made.sort(key=lambda c: -pool.score[c])  # stable: ties keep creation order
            nxt.append([])
            for c in made:
                if len(nxt[-1]) == k:
                    break
                if pool.expandable(c, num_drafts):
                    nxt[-1].append(c)
        if level == levels or not any(nxt):
            break
        # the head's output at each new frontier node: its token, its parent entry's output
        pad = [[PAD_ID, 0]] * k
        entries = [[[p.tok[c], p.src[c]] for c in nodes] for p, nodes in zip(pools, nxt)]
        both = torch.tensor([(e + pad)[:k] for e in entries], device=device)  # [B, k, 2]
        tokens, parent = both[..., 0], both[..., 1]  # [B, k] each: token, parent's entry
        slots = torch.arange((level - 1) * k, level * k, device=device)  # [k]
        visible = anc.gather(1, parent[..., None].expand(-1, -1, size))  # [B, k, M]
        visible[:, torch.arange(k, device=device), slots] = True
        feats = h.gather(1, parent[..., None].expand(-1, -1, h.shape[-1]))  # [B, k, H]
        pos = (root_pos + level)[:, None].expand(b, k)  # [B, k]
        h = head(tokens, feats, pos, step=level + 1, embed=embed, cache=cache,
                 tree=scratch.at(slots, visible, root_pos + 1))  # [B, k, H]
        anc, frontier, steps = visible, nxt, steps + 1

    for pool, extra in zip(pools, free):
        pool.complete(spec.nodes + extra, run)
    width = max(len(p.tok) for p in pools)
    tok = torch.full((b, width), PAD_ID, dtype=torch.long)  # [B, P]
    score = torch.full((b, width), float("-inf"))  # [B, P]
    par = torch.full((b, width), ROOT, dtype=torch.long)  # [B, P]
    depth = torch.ones(b, width, dtype=torch.long)  # [B, P]
    for r, p in enumerate(pools):
        n = len(p.tok)
        tok[r, :n], score[r, :n] = torch.tensor(p.tok), torch.tensor(p.score)
        par[r, :n], depth[r, :n] = torch.tensor(p.parent), torch.tensor(p.depth)
    extra = torch.tensor(free)  # [B]
    dt = _select(tok.to(device), score.to(device), par.to(device), depth.to(device), spec,
                 steps, free=extra.to(device), sure=num_drafts)
    return dt, dt.source.tolist()


def tree_round(head: TreeDrafter, embed: nn.Module, lm_head: nn.Module, hcache, kv: TargetKV,
               states: list[ListConstraint], tails: list[list[int]], pending: Pending,
               num_drafts: int, spec: TreeSpec) -> TreeRound:
    """Draft each row's constrained tree from its block start ``tails[r]`` = [x_n, forced...]
    (``states[r]`` is after it), verify it masked, keep the agreeing path (module docstring)."""
    device = kv.lengths.device
    b = len(tails)
    free = [len(t) - 1 for t in tails]
    pools = [_Pool(_Walker(s, t[1:])) for s, t in zip(states, tails)]
    run = states[0].trie.item_path.shape[1]  # L + 1
    dt, src = draft_constrained_tree(head, embed, lm_head, hcache, pending, pools, num_drafts,
                                     spec, max_levels(num_drafts, run), run, free)
    drafted_at = clock(device)

    root = torch.tensor([t[0] for t in tails], device=device)  # [B]: x_n
    block = torch.cat((root[:, None], dt.tokens), dim=1)  # [B, N+1]
    depths = torch.cat((torch.zeros_like(root)[:, None], dt.depths), dim=1)  # [B, N+1]
    start = kv.lengths.clone()  # [B]: position of x_n
    feats = kv.forward_block(block, depths, dt.mask)  # [B, N+1, H]
    valid = dt.valid.tolist()
    legal = [pools[r].legal(q) if j == 0 or valid[r][j - 1] else np.zeros(0, np.int64)
             for r in range(b) for j, q in enumerate([ROOT] + src[r])]
    logits = lm_head(feats)  # [B, N+1, V]
    mask = legal_mask(legal, logits.shape[-1], device).view(logits.shape)  # [B, N+1, V]
    verified = apply_mask(logits, mask).argmax(-1)  # [B, N+1]
    accepted, leaf = accept_tree(dt, verified)  # [B], [B]
    kv.keep_mask(dt.mask[torch.arange(b, device=device), leaf])
    width = int(depths.max()) + 1
    path = path_indices(dt, leaf, width)  # [B, W]
    h_ids = verified.gather(1, path)  # [B, W]: x_{n+j+1} on the kept path
    h_feats = feats.gather(1, path[..., None].expand(-1, -1, feats.shape[-1]))  # [B, W, H]
    h_pos = start[:, None] + torch.arange(width, device=device)  # [B, W]

    out = []
    for r, (a, lf, v) in enumerate(zip(accepted.tolist(), leaf.tolist(), verified.tolist())):
        pool, m = pools[r], free[r]
        if a < m:
            raise RuntimeError("the target disagreed with a forced token")
        node = ROOT if lf == 0 else src[r][lf - 1]
        nodes = []  # the kept path, x_n excluded
        while node != ROOT:
            nodes.append(node)
            node = pool.parent[node]
        nodes.reverse()
        last = nodes[-1] if nodes else ROOT
        pool.walker.goto(pool.path_of(last))  # the state after the kept path
        picks = [n for n in nodes if pool.choice[n]]
        proposed = max((pool.choices[q] for q, ok in zip(src[r], valid[r]) if ok), default=0)
        judged = [pool.tok[n] for n in picks] + ([v[lf]] if len(pool.legal(last)) > 1 else [])
        out.append(([pool.tok[n] for n in nodes[m:]], [not pool.choice[n] for n in nodes[m:]],
                    v[lf], (proposed, len(picks), judged)))
    pending = Pending(h_ids, h_feats, h_pos, (accepted + 1).tolist())
    return TreeRound(pending, out, dt.head_steps, drafted_at)
