"""Constrained decoding in the reference engine: every list is legal under the catalog
(``catalog.constraint``), and the output is plain constrained greedy's, token for token.

Each request has a ``ListConstraint``; the engine masks the target's logits with it at every
position it verifies (``apply_mask``) and takes the argmax.

- plain (``ar``, the reference): one token per target forward, masked greedy.
- ``skip_forced`` (plain, no head): after every emitted token the run of forced tokens
  (``forced_run``: the only legal token, then the next one, ...) is appended without a forward.
  A row's next block is ``[x_n, forced...]``; it enters the cache in the next forward, rows
  right-padded to the longest (``kv.keep`` of each row's length), each row's logits read at its
  last real input.
- chain (a head; forced tokens are always skipped): the block is ``[x_n, forced..., chain]``.
  At each chain position the head drafts its best *legal* token (its logits masked with the
  state after the row's earlier tokens), unless the position is forced: then the forced token is
  taken without the head's argmax and is no draft. A row's chain ends after K choices
  (``num_drafts``) and the forced run that follows the K-th, or at ``<eos>``; so K counts real
  choices. The head runs one chained step per position up to the row's last choice, forced
  positions included (it needs inputs at every position; the next target forward provides the
  real ones, as for drafts), so its step index is the chain position, not the choice count.
  The target verifies the block masked at every position with the state after the row's tokens
  up to there (a forced position's mask has one legal token, so the target agrees with it by
  construction), keeps the agreeing prefix and its own next token, and the constraint is rolled
  back to that prefix (``checkpoint`` / ``rollback``). The target's own token is never forced
  (every forced run lies inside a block); the forced run after it is appended at once and
  starts the next block. The head's cache needs no rollback, as in ``engine``: chained steps
  write stand-in entries at their positions, which the next round's pass over the verified
  inputs overwrites; rows run the steps in lockstep, a row whose chain has ended on padding.
- tree (a head and a ``TreeSpec``; ``decoding.constrained_tree``): the same block start
  ``[x_n, forced...]``, then an EAGLE-2 tree of the head's top-k legal tokens per node (a forced
  position gets its one token, a path at most K choices), verified in one forward under the
  tree mask with the same per-position masks; the agreeing path is kept and the round ends as
  a chain round does (``_close``). The batch loop is shared; only the round differs.

Accounting (``decoding.accounting``): a round's drafts are its choices (``accept_by_pos`` by
choice index), skipped forced tokens count in ``forced_tokens`` when emitted; the first token
(prefill) and the target's own tokens are never counted as forced.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from padrec_vllm.catalog.constraint import ListConstraint, apply_mask, fill_mask
from padrec_vllm.catalog.tokens import PAD_ID
from padrec_vllm.decoding.accounting import RequestAccounting
from padrec_vllm.decoding.constrained_tree import tree_round
from padrec_vllm.decoding.kv import TargetKV, prefill
from padrec_vllm.decoding.protocol import Drafter
from padrec_vllm.decoding.speculative import accepted_prefix
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
    slots: list[int] | None,
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
        # a chain: the tail, then K choices each followed by a forced run
        hcache = head.new_cache(b, ids.shape[1] + max_new_tokens + (num_drafts + 2) * (run + 1))
        # pending head inputs (f_p, x_{p+1}) at positions start..start+count-1, right-padded
        h_ids = ids.roll(-1, dims=1)  # [B, T]
        h_ids[ar, lens - 1] = nxt
        pending = (h_ids, feats, torch.arange(ids.shape[1], device=device).expand(b, -1), lens)

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
                pending = tuple(x[sel] for x in pending)

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
                               num_drafts, buf[: len(states)])
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
    run = state.forced_run() if skip else []
    for tok in run:
        state.accept(tok)
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


def _fill(out: torch.Tensor, legal: Sequence[np.ndarray | None]) -> torch.Tensor:
    """``out`` [N, V] bool with row n True at the token ids ``legal[n]`` (None: all False)."""
    arrays = [np.zeros(0, np.int64) if a is None else a for a in legal]
    rows = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])  # [n]
    cols = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)  # [n]
    out.zero_()
    out[torch.from_numpy(rows).to(out.device), torch.from_numpy(cols).to(out.device)] = True
    return out


class _Round(NamedTuple):
    """One constrained chain round, for the batch loop."""

    # the head's next pending inputs: ids [B, T], features [B, T, H], positions [B, T], counts [B]
    pending: tuple
    # per row: (kept tokens after the tail, their forced flags, the target's own next token,
    #           (choices proposed, choices accepted, the target's tokens at the judged choices))
    rows: list[tuple[list[int], list[bool], int, tuple[int, int, list[int]]]]
    head_steps: int
    drafted_at: float  # clock when drafting ended


def _chain_round(head: Drafter, embed: nn.Module, lm_head: nn.Module, hcache, kv: TargetKV,
                 states: list[ListConstraint], tails: list[list[int]], pending: tuple,
                 num_drafts: int, buf: torch.Tensor) -> _Round:
    """Draft each row's constrained chain after its tail, verify the blocks masked, keep the
    agreeing prefixes (module docstring)."""
    device = buf.device
    b = len(tails)
    h_ids, h_feats, h_pos, h_count = pending
    ar = torch.arange(b, device=device)  # [B]
    hidden = head(h_ids, h_feats, h_pos, step=1, embed=embed, cache=hcache)  # [B, T, H]
    h = hidden[ar, h_count - 1][:, None]  # [B, 1, H]
    pos = h_pos[ar, h_count - 1][:, None]  # [B, 1]
    blocks = [list(t) for t in tails]
    # legal[r][j]: legal tokens after blocks[r][:j+1] (tail positions: the next forced token)
    legal = [[np.array([t], np.int64) for t in tail[1:]] for tail in tails]
    choice = [[False] * len(t) for t in tails]  # per block position: a head's choice
    start_cp = [s.checkpoint() for s in states]  # the state after the tail
    active, n_choices, step = [True] * b, [0] * b, 1
    while True:
        # the head's output at step s proposes block position s of the rows that have reached it
        at = [r for r in range(b) if active[r] and len(blocks[r]) == step]
        for r in at:
            legal[r].append(states[r].allowed())
        choosing = {r for r in at if len(legal[r][-1]) > 1}
        if choosing:
            logits = head.logits(h, lm_head)[:, 0]  # [B, V]
            mask = _fill(buf, [legal[r][-1] if r in choosing else None for r in range(b)])
            best = apply_mask(logits, mask).argmax(-1).tolist()  # [B]
        for r in at:
            tok = best[r] if r in choosing else int(legal[r][-1][0])
            states[r].accept(tok)
            blocks[r].append(tok)
            choice[r].append(r in choosing)
            n_choices[r] += r in choosing
            if n_choices[r] == num_drafts:
                for forced in states[r].forced_run():
                    legal[r].append(np.array([forced], np.int64))
                    states[r].accept(forced)
                    blocks[r].append(forced)
                    choice[r].append(False)
            if n_choices[r] == num_drafts or states[r].is_done():
                legal[r].append(states[r].allowed())  # for the target's own next token
                active[r] = False
        if not any(active):
            break
        step += 1
        pos = pos + 1  # [B, 1]
        x = [blocks[r][step - 1] if len(blocks[r]) >= step else PAD_ID for r in range(b)]
        h = head(torch.tensor(x, device=device)[:, None], h, pos, step=step, embed=embed,
                 cache=hcache)  # [B, 1, H]
    drafted_at = clock(device)

    block, lens = _pad(blocks, device)  # [B, T], [B]
    t = block.shape[1]
    start = kv.lengths.clone()  # [B]: position of x_n
    feats = kv.forward_block(block)  # [B, T, H]
    masks = torch.empty(b * t, buf.shape[1], dtype=torch.bool, device=device)  # [B*T, V]
    flat = [legal[r][j] if j < len(legal[r]) else None for r in range(b) for j in range(t)]
    masks = _fill(masks, flat).view(b, t, -1)  # [B, T, V]
    verified = apply_mask(lm_head(feats), masks).argmax(-1)  # [B, T]
    accepted = accepted_prefix(block[:, 1:], verified, lens - 1)  # [B]
    kv.keep(accepted + 1)
    h_pos = start[:, None] + torch.arange(t, device=device)  # [B, T]
    out = []
    for r, (a, v) in enumerate(zip(accepted.tolist(), verified.tolist())):
        n_tail = len(tails[r])
        if a < n_tail - 1:
            raise RuntimeError("the target disagreed with a forced token")
        states[r].rollback(start_cp[r] + a + 1 - n_tail)
        picks = [j for j in range(1, len(blocks[r])) if choice[r][j]]
        took = sum(j <= a for j in picks)  # choices accepted; the next one, if any, was rejected
        verdict = (len(picks), took, [v[j - 1] for j in picks[: took + 1]])
        kept = blocks[r][n_tail : a + 1]
        out.append((kept, [not c for c in choice[r][n_tail : a + 1]], v[a], verdict))
    return _Round((verified, feats, h_pos, accepted + 1), out, step, drafted_at)
