"""Constrained decoding in the reference engine: every list is legal under the catalog
(``catalog.constraint``), and the output is plain constrained greedy's, token for token.

Each request has a ``ListConstraint``; the engine masks the target's logits with it at every
position it verifies and takes the argmax.

- plain (``ar``, the reference): one token per target forward, masked greedy (``apply_mask``).
- ``skip_forced`` (plain, no head): after every emitted token the run of forced tokens
  (``accept_forced``: the only legal token, then the next one, ...) is appended without a
  forward. A row's next block is ``[x_n, forced...]``; it enters the cache in the next forward,
  rows right-padded to the longest (``kv.keep`` of each row's length), each row's logits read at
  its last real input.
- chain (a head; forced tokens are always skipped): the block is ``[x_n, forced..., chain]``,
  the chain being K choices (``num_drafts``), each followed by the forced run after it; the
  chain ends early at ``<eos>``. Head calls: step 1 runs over the verified inputs the head has
  not seen (``Pending``, up to x_n); its output at x_n proposes the token after x_n. The head
  then runs one single-token step per block position, forced ones included, up to the row's
  last choice: a step needs the head's own output at the position before as its input feature
  (as in training, where step k reads step k-1's outputs one position back), so a forced
  position is fed through the head like any other, only its token is not drafted. At a choice
  the head proposes its best *legal* token under the state after the row's earlier tokens; the
  forced run that follows is appended at once, and the head's steps through it need no logits.
  Rows run the steps in lockstep, a row that is waiting at a forced position or has ended its
  chain on its next token or padding. The head's step index is its call number (1, 2, ...), so
  it counts positions, not choices. (Feeding a whole forced run in one multi-token call would
  need stand-in features at its later positions; with the latest available feature as stand-in
  the first code after ``<sep>`` lost nearly all its acceptance, 0.69 to 0.05, on the demo
  Beauty heads, so every position gets its own step.)
- the target verifies the block in one forward. A forced position's token is the only legal
  one, so the target agrees with it by construction; its token is computed only before each
  choice and after the block (``checks``), masked with the state after the row's tokens up to
  there. The row keeps the agreeing prefix and the target's own next token; the constraint is
  rolled back to that prefix (``checkpoint`` / ``rollback``). The target's own token is never
  forced (every forced run lies inside a block); the forced run after it is appended at once
  and starts the next block. The head's cache needs no rollback, as in ``engine``: chained
  steps write stand-in entries at their positions, which the next round's pass over the
  verified inputs overwrites.
- the masked argmax (head and target alike, ``_best_legal``): the unmasked argmax when it is
  legal (it is then the lowest id of the highest logit among the legal ones too, so the result
  equals ``apply_mask(...).argmax()``), else the argmax over the legal ids (sorted) only; no
  [V] mask is built.
- tree (a head and a ``TreeSpec``; ``decoding.constrained_tree``): the same block start
  ``[x_n, forced...]``, then an EAGLE-2 tree of the head's top-k legal tokens per node (a forced
  position gets its one token, a path at most K choices), verified in one forward under the
  tree mask with the same per-position masks; the agreeing path is kept and the round ends as
  a chain round does (``_close``). The batch loop is shared; only the round differs.

Accounting (``decoding.accounting``): a round's drafts are its choices (``accept_by_pos`` by
choice index), ``draft_forwards`` its head calls (step 1 and the single steps); skipped forced
tokens count in ``forced_tokens`` when emitted; the first token (prefill) and the target's own
tokens are never counted as forced.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from padrec_vllm.catalog.constraint import ListConstraint, apply_mask, fill_mask
from padrec_vllm.catalog.tokens import PAD_ID, SlotRule
from padrec_vllm.decoding.accounting import RequestAccounting
from padrec_vllm.decoding.constrained_tree import Pending, tree_round
from padrec_vllm.decoding.kv import TargetKV, prefill
from padrec_vllm.decoding.protocol import Drafter
from padrec_vllm.decoding.timing import charge, clock
from padrec_vllm.decoding.tree import TreeSpec


def decode_constrained_batch(
    target: nn.Module,
    prompts: list[list[int]],
    states: list[ListConstraint],
    head: Drafter | None,
    num_drafts: int,
    *,
    max_new_tokens: int,
    eos_id: int,
    slots: SlotRule | None,
    skip_forced: bool,
    tree: TreeSpec | None = None,
) -> list[RequestAccounting]:
    """One batch of ``engine.generate`` under ``states`` (one per prompt, advanced in place);
    with ``tree``, the head drafts constrained trees (``decoding.constrained_tree``)."""
    device = next(target.parameters()).device
    b = len(prompts)
    rows = [RequestAccounting(num_drafts, slots) for _ in prompts]
    alive = list(range(b))  # batch row -> index into rows
    states = list(states)
    skip = skip_forced or head is not None
    embed, lm_head = target.get_input_embeddings(), target.lm_head

    t0 = clock(device)
    kv, ids, lens, feats, logits = prefill(target, prompts, device)  # logits [B, V]
    ar = torch.arange(b, device=device)  # [B]
    buf = torch.empty(logits.shape, dtype=torch.bool, device=device)  # [B, V]: masks, reused
    nxt = apply_mask(logits, fill_mask(states, buf)).argmax(-1)  # [B]: x_n
    tails, finished = [], []  # tails[i]: [x_n, forced...], emitted and not yet in the cache
    for r, tok in enumerate(nxt.tolist()):
        tail, done = _close(rows[r], states[r], [], [], tok, skip, max_new_tokens, eos_id)
        tails.append(tail)
        finished.append(done)
    charge(rows, alive, "prefill", clock(device) - t0)

    if head is not None:
        run = states[0].trie.item_path.shape[1]  # L + 1: a forced run is at most L + 1 long
        # a chain: the tail, then K choices each followed by a forced run; padding inputs of
        # rows that have stopped drafting run up to K positions past their last
        hcache = head.new_cache(b, ids.shape[1] + max_new_tokens + (num_drafts + 2) * (run + 2))
        h_ids = ids.roll(-1, dims=1)  # [B, T]
        h_ids[ar, lens - 1] = nxt
        pending = Pending(h_ids, feats, torch.arange(ids.shape[1], device=device).expand(b, -1),
                           lens.tolist())

    while True:
        if any(finished):
            keep = [i for i, f in enumerate(finished) if not f]
            alive = [alive[i] for i in keep]
            if not alive:
                break
            sel = torch.tensor(keep, device=device)  # [B']
            kv.select(sel)
            states, tails = [states[i] for i in keep], [tails[i] for i in keep]
            if head is not None:
                hcache.select(sel)
                pending = pending.select(keep, sel)

        t0 = clock(device)
        if head is None:
            toks = _plain_forward(lm_head, kv, states, tails, buf[: len(states)])
            tails, finished = [], []
            for i, tok in enumerate(toks):
                rows[alive[i]].plain_forward()
                tail, done = _close(rows[alive[i]], states[i], [], [], tok, skip,
                                    max_new_tokens, eos_id)
                tails.append(tail)
                finished.append(done)
            charge(rows, alive, "verify", clock(device) - t0)
            continue

        if tree is None:
            rnd = _chain_round(head, embed, lm_head, hcache, kv, states, tails, pending,
                               num_drafts)
        else:
            rnd = tree_round(head, embed, lm_head, hcache, kv, states, tails, pending, num_drafts,
                             tree)
        charge(rows, alive, "draft", rnd.drafted_at - t0)
        pending, tails, finished = rnd.pending, [], []
        for i, (kept, forced, bonus, verdict) in enumerate(rnd.rows):
            row = rows[alive[i]]
            row.round(*verdict, rnd.head_steps)
            tail, done = _close(row, states[i], kept, forced, bonus, skip, max_new_tokens, eos_id)
            tails.append(tail)
            finished.append(done)
        charge(rows, alive, "verify", clock(device) - rnd.drafted_at)
    return rows


def _close(row: RequestAccounting, state: ListConstraint, kept: list[int], forced: list[bool],
           bonus: int, skip: bool, max_new_tokens: int, eos_id: int) -> tuple[list[int], bool]:
    """Emit a forward's tokens: ``kept`` (already accepted by ``state``; ``forced`` marks the
    forced ones), the target's own token ``bonus``, then, when ``skip``, the forced run after it.
    -> (the next block's start [bonus, forced...], finished)."""
    if not state.is_done():  # done: <eos> is among ``kept``, the rest is never emitted
        state.accept(bonus)
    run = state.accept_forced() if skip else []
    flags = forced + [False] + [True] * len(run)
    return [bonus] + run, row.emit(kept + [bonus] + run, max_new_tokens, eos_id, flags)


def _pad(blocks: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids [B, T] and lengths [B] of the rows' blocks."""
    lens = torch.tensor([len(x) for x in blocks], device=device)  # [B]
    ids = torch.full((len(blocks), int(lens.max())), PAD_ID, dtype=torch.long)  # [B, T]
    for r, x in enumerate(blocks):
        ids[r, : len(x)] = torch.tensor(x)
    return ids.to(device), lens


def _plain_forward(lm_head: nn.Module, kv: TargetKV, states: list[ListConstraint],
                   tails: list[list[int]], buf: torch.Tensor) -> list[int]:
    """One target forward over each row's tail -> its masked greedy next token per row."""
    block, lens = _pad(tails, buf.device)  # [B, T], [B]
    feats = kv.forward_block(block)  # [B, T, H]
    kv.keep(lens)
    logits = lm_head(feats[torch.arange(len(tails), device=buf.device), lens - 1])  # [B, V]
    return apply_mask(logits, fill_mask(states, buf)).argmax(-1).tolist()


def _best_legal(logits: torch.Tensor, row: int, top: int, legal: np.ndarray) -> int:
    """The legal token (``legal``: sorted ids, at least one) with the highest logit in row
    ``row`` of ``logits`` [N, V], whose unmasked argmax is ``top``; ties go to the lowest id, as
    ``apply_mask(...).argmax()`` breaks them. The argmax, when legal, is the answer (it is the
    lowest id with the highest logit of all), so the masked argmax is needed only when it is not."""
    i = int(np.searchsorted(legal, top))
    if i < len(legal) and legal[i] == top:
        return top
    if len(legal) == 1:
        return int(legal[0])
    at = torch.from_numpy(legal.copy()).to(logits.device)  # [n]; the trie's arrays are read-only
    return int(legal[int(logits[row, at].argmax())])


class _Round(NamedTuple):
    """One constrained chain round, for the batch loop."""

    pending: Pending  # the head's next pending inputs
    # per row: (kept tokens after the tail, their forced flags, the target's own next token,
    #           (choices proposed, choices accepted, the target's tokens at the judged choices))
    rows: list[tuple[list[int], list[bool], int, tuple[int, int, list[int]]]]
    head_steps: int
    drafted_at: float  # clock when drafting ended


def _chain_round(head: Drafter, embed: nn.Module, lm_head: nn.Module, hcache, kv: TargetKV,
                 states: list[ListConstraint], tails: list[list[int]], pending: Pending,
                 num_drafts: int) -> _Round:
    """Draft each row's constrained chain after its tail, verify the blocks masked, keep the
    agreeing prefixes (module docstring)."""
    b = len(tails)
    h_ids, h_feats, h_pos, counts = pending
    device = h_ids.device
    hidden = head(h_ids, h_feats, h_pos, step=1, embed=embed, cache=hcache)  # [B, T, ...]
    if b == 1 and counts[0] == h_ids.shape[1]:  # unpadded
        h, pos = hidden[:, -1:], h_pos[:, -1:]  # [1, 1, ...], [1, 1]
    else:
        last = torch.tensor(counts, device=device) - 1  # [B]
        ar = torch.arange(b, device=device)  # [B]
        h, pos = hidden[ar, last][:, None], h_pos[ar, last][:, None]  # [B, 1, ...], [B, 1]
    blocks = [list(t) for t in tails]
    choice = [[False] * len(t) for t in tails]  # per block position: a head's choice
    # per row: (block index j, legal tokens after blocks[r][:j + 1]) where the target's token
    # is needed: before each choice (forced positions agree by construction)
    checks: list[list[tuple[int, np.ndarray]]] = [[] for _ in range(b)]
    start_cp = [s.checkpoint() for s in states]  # the state after the tail
    going, step = set(range(b)), 1
    while True:
        # the head's output at step s proposes block position s; a row's block holds every
        # forced token up to its next choice, so a row that has reached its block's end chooses
        choosing = [r for r in going if len(blocks[r]) == step]
        if choosing:
            logits = head.logits(h, lm_head)[:, 0]  # [B, V]
            top = logits.argmax(-1).tolist()  # [B]
        for r in choosing:
            legal = states[r].allowed()
            tok = _best_legal(logits, r, top[r], legal)
            checks[r].append((step - 1, legal))
            states[r].accept(tok)
            run = states[r].accept_forced()
            blocks[r] += [tok] + run
            choice[r] += [True] + [False] * len(run)
            if len(checks[r]) == num_drafts or states[r].is_done():
                going.discard(r)  # its chain ends after the forced run that follows
        if not going:
            break
        step += 1
        pos = pos + 1  # [B, 1]
        x = [[blocks[r][step - 1] if r in going else PAD_ID] for r in range(b)]
        h = head(torch.tensor(x, device=device), h, pos, step=step, embed=embed,
                 cache=hcache)  # [B, 1, ...]
    drafted_at = clock(device)

    block = torch.tensor(blocks, device=device) if b == 1 else _pad(blocks, device)[0]  # [B, T]
    for r in range(b):  # and after the block (nothing after <eos>)
        if not states[r].is_done():
            checks[r].append((len(blocks[r]) - 1, states[r].allowed()))
    start = kv.lengths.clone()  # [B]: position of x_n
    feats = kv.forward_block(block)  # [B, T, H]
    at = [(r, j, legal) for r in range(b) for j, legal in checks[r]]
    at_j = torch.tensor([j for _, j, _ in at], device=device)  # [N]
    if b == 1:
        logits = lm_head(feats[0, at_j])  # [N, V]
    else:
        logits = lm_head(feats[torch.tensor([r for r, _, _ in at], device=device), at_j])
    top = logits.argmax(-1).tolist()  # [N]
    target_tok = {(r, j): _best_legal(logits, n, top[n], legal)
                  for n, (r, j, legal) in enumerate(at)}
    accepted, bonus, out = [], [], []
    for r in range(b):
        n_tail, n_choices = len(tails[r]), sum(choice[r])
        took, a = 0, len(blocks[r]) - 1
        for j, _ in checks[r][:n_choices]:  # the choice at block index j + 1
            if target_tok[r, j] != blocks[r][j + 1]:
                a = j
                break
            took += 1
        accepted.append(a)
        bonus.append(target_tok.get((r, a), PAD_ID))  # none after <eos>: never emitted
        states[r].rollback(start_cp[r] + a + 1 - n_tail)
        judged = [target_tok[r, j] for j, _ in checks[r][: min(took + 1, n_choices)]]
        kept = blocks[r][n_tail : a + 1]
        out.append((kept, [not c for c in choice[r][n_tail : a + 1]], bonus[-1],
                    (n_choices, took, judged)))
    kv.keep(torch.tensor([a + 1 for a in accepted], device=device))
    # the head's next pending inputs: (f_{n+j}, x_{n+j+1}) for the kept positions j = 0..a
    if b == 1:  # unpadded
        a = accepted[0]
        nxt = torch.tensor([blocks[0][1 : a + 1] + bonus], device=device)  # [1, a + 1]
        feats = feats[:, : a + 1]  # [1, a + 1, H]
    else:
        nxt = block.roll(-1, dims=1)  # [B, T]
        nxt[torch.arange(b, device=device), torch.tensor(accepted, device=device)] = (
            torch.tensor(bonus, device=device))
    h_pos = start[:, None] + torch.arange(nxt.shape[1], device=device)  # [B, T]
    pending = Pending(nxt, feats, h_pos, [a + 1 for a in accepted])
    return _Round(pending, out, step, drafted_at)
