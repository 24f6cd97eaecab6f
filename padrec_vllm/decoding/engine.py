"""Reference engine: batched greedy, chain and tree speculative decoding in plain PyTorch.

Works with any Hugging Face causal LM that has ``.model`` (returning post-final-norm hidden
states, the features) and ``.lm_head`` — LlamaForCausalLM, Qwen2ForCausalLM. It knows nothing
about tokenization: prompts and outputs are token-id lists. With a drafter, the output is the
target's greedy output (token for token, up to floating-point ties).

Batching: prompts are taken ``batch_size`` at a time, in order; each batch is right-padded and
prefilled in one forward; rows leave the batch when they finish (``eos`` emitted — it is kept in
the output — or ``max_new_tokens`` reached). Per-row acceptance: rows of one round keep different
numbers of tokens; the target's cache marks the rest as holes (``kv.TargetKV``), the head's cache
(``protocol.DraftCache``) is addressed by position and needs no rollback. A round drafts a chain
(``speculative``) or, with a ``TreeSpec``, a tree verified under a tree mask (``tree``); either
way it emits the target's greedy tokens.

With ``constraints`` (one ``catalog.constraint.ListConstraint`` per prompt) every list is legal
under the catalog and the output is plain *constrained* greedy's (``decoding.constrained``;
chains there, trees in ``decoding.constrained_tree``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import nn
from tqdm.auto import tqdm

from padrec_vllm.catalog.constraint import ListConstraint
from padrec_vllm.catalog.tokens import EOS_ID, SlotRule
from padrec_vllm.decoding.constrained import decode_constrained_batch
from padrec_vllm.decoding.kv import TargetKV, prefill
from padrec_vllm.decoding.protocol import Drafter
from padrec_vllm.decoding.accounting import RequestAccounting, RequestResult, slot_rule_of
from padrec_vllm.decoding.speculative import accepted_prefix, draft_chain
from padrec_vllm.decoding.timing import charge, clock
from padrec_vllm.decoding.tree import TreeSpec, accept_tree, draft_tree, path_indices


def generate(
    target: nn.Module,
    prompts: list[list[int]],
    *,
    max_new_tokens: int,
    eos_id: int | None,
    batch_size: int,
    head: Drafter | None = None,
    num_draft_tokens: int | None = None,
    slot_of_token: SlotRule | torch.Tensor | list[int] | None = None,
    min_draft_confidence: float = 0.0,
    tree: TreeSpec | None = None,
    progress: str | None = None,
    constraints: Sequence[ListConstraint] | None = None,
    skip_forced: bool = False,
) -> list[RequestResult]:
    """Greedy-decode every prompt; with ``head``, by speculative decoding (chains, or trees).

    ``num_draft_tokens`` (K) defaults to ``head.num_steps``; it is the most drafts a round
    proposes. ``min_draft_confidence`` in [0, 1): 0 proposes all K every round; above 0 a round's
    chain stops at the first draft whose probability under the head is below it
    (``speculative.draft_chain``), which never changes the output, only the work. ``tree`` drafts
    a tree of ``tree.nodes`` candidates up to K deep each round and verifies it in one forward
    (``decoding.tree``; the head must be a ``protocol.TreeDrafter``); it excludes
    ``min_draft_confidence``. ``slot_of_token`` (a ``SlotRule`` or a [V] table; default: the
    head's rule, if any) enables ``accept_by_slot``. Results are in prompt order, with figures as
    defined in ``decoding.accounting``. ``progress``, when given, is the label of a progress bar
    over batches.

    ``constraints``: one fresh ``ListConstraint`` per prompt, advanced in place (afterwards each
    holds its request's list); None decodes unconstrained. Under constraints ``eos_id`` must be
    ``<eos>``, and plain decoding is masked greedy, the reference; ``skip_forced`` appends forced
    tokens without target forwards (plain decoding; chains and trees always skip them); chains
    and trees draft legal tokens only, K counting choices (``decoding.constrained``,
    ``decoding.constrained_tree``: a tree's nodes are each node's top-k legal tokens, the forced
    run after the target's token comes on top of ``tree.nodes``). ``min_draft_confidence`` is
    refused under constraints (not built).
    """
    if max_new_tokens < 1 or batch_size < 1:
        raise ValueError("max_new_tokens and batch_size must be >= 1")
    if not 0.0 <= min_draft_confidence < 1.0:
        raise ValueError(f"min_draft_confidence must be in [0, 1), got {min_draft_confidence}")
    if tree is not None and (head is None or min_draft_confidence > 0):
        raise ValueError("tree drafting needs a head and excludes min_draft_confidence")
    if constraints is not None:
        if len(constraints) != len(prompts):
            raise ValueError(f"{len(constraints)} constraints for {len(prompts)} prompts")
        if min_draft_confidence > 0:
            raise ValueError("constrained decoding has no min_draft_confidence yet")
        if eos_id != EOS_ID:
            raise ValueError(f"constrained decoding ends lists with <eos> ({EOS_ID}), not {eos_id}")
    elif skip_forced:
        raise ValueError("skip_forced needs constraints")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    num_drafts = 0
    if head is not None:
        num_drafts = num_draft_tokens or getattr(head, "num_steps", 0)
        if num_drafts < 1:
            raise ValueError("speculative decoding needs num_draft_tokens >= 1")
    if slot_of_token is None and head is not None:
        slot_of_token = getattr(head, "slot_rule", None)
        if slot_of_token is None:  # a drafter with a bare table
            slot_of_token = getattr(head, "slot_of_token", None)
    if isinstance(slot_of_token, torch.Tensor):
        slot_of_token = slot_of_token.tolist()
    slots = slot_rule_of(slot_of_token)
    results: list[RequestResult] = []
    with torch.inference_mode():
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, desc=progress, unit="batch", disable=progress is None):
            batch = prompts[start : start + batch_size]
            if constraints is None:
                rows = _decode_batch(
                    target,
                    batch,
                    head,
                    num_drafts,
                    max_new_tokens=max_new_tokens,
                    eos_id=eos_id,
                    slots=slots,
                    min_confidence=min_draft_confidence,
                    tree=tree,
                )
            else:
                rows = decode_constrained_batch(
                    target,
                    batch,
                    list(constraints[start : start + batch_size]),
                    head,
                    num_drafts,
                    max_new_tokens=max_new_tokens,
                    eos_id=eos_id,
                    slots=slots,
                    skip_forced=skip_forced,
                    tree=tree,
                )
            results.extend(row.result() for row in rows)
    return results


def _decode_batch(
    target: nn.Module,
    prompts: list[list[int]],
    head: Drafter | None,
    num_drafts: int,
    *,
    max_new_tokens: int,
    eos_id: int | None,
    slots: SlotRule | None,
    min_confidence: float,
    tree: TreeSpec | None,
) -> list[RequestAccounting]:
    device = next(target.parameters()).device
    b = len(prompts)
    rows = [RequestAccounting(num_drafts, slots) for _ in prompts]
    alive = list(range(b))  # batch row -> index into rows
    embed, lm_head = target.get_input_embeddings(), target.lm_head

    t0 = clock(device)
    kv, ids, lens, feats, logits = prefill(target, prompts, device)
    ar = torch.arange(b, device=device)  # [B]
    nxt = logits.argmax(-1)  # [B]: x_n
    finished = [rows[r].emit([tok], max_new_tokens, eos_id) for r, tok in enumerate(nxt.tolist())]
    charge(rows, alive, "prefill", clock(device) - t0)

    if head is not None:
        hcache = head.new_cache(b, ids.shape[1] + max_new_tokens + num_drafts + 1)
        # pending head inputs (f_p, x_{p+1}) at positions start..start+count-1, right-padded
        h_ids = ids.roll(-1, dims=1)  # [B, T]
        h_ids[ar, lens - 1] = nxt
        h_feats, h_count = feats, lens  # [B, T, H], [B]
        h_pos = torch.arange(ids.shape[1], device=device).expand(b, -1)  # [B, T]

    while True:
        if any(finished):
            keep = [i for i, f in enumerate(finished) if not f]
            alive = [alive[i] for i in keep]
            if not alive:
                break
            sel = torch.tensor(keep, device=device)  # [B']
            kv.select(sel)
            nxt = nxt[sel]
            if head is not None:
                hcache.select(sel)
                h_ids, h_feats, h_count, h_pos = h_ids[sel], h_feats[sel], h_count[sel], h_pos[sel]

        if head is None:
            t0 = clock(device)
            feats = kv.forward_block(nxt[:, None])  # [B, 1, H]
            kv.keep(torch.ones_like(nxt))
            nxt = lm_head(feats[:, 0]).argmax(-1)  # [B]
            finished = []
            for i, tok in enumerate(nxt.tolist()):
                rows[alive[i]].plain_forward()
                finished.append(rows[alive[i]].emit([tok], max_new_tokens, eos_id))
            charge(rows, alive, "verify", clock(device) - t0)
            continue

        t0 = clock(device)
        pending = (h_ids, h_feats, h_pos, h_count)
        if tree is None:
            rnd = _chain_round(
                head, embed, lm_head, hcache, kv, nxt, pending, num_drafts, min_confidence
            )
        else:
            rnd = _tree_round(head, embed, lm_head, hcache, kv, nxt, pending, num_drafts, tree)
        charge(rows, alive, "draft", rnd.drafted_at - t0)
        nxt, (h_ids, h_feats, h_pos, h_count) = rnd.next_token, rnd.pending
        finished = []
        for i, (emitted, proposed, a) in enumerate(zip(rnd.emitted, rnd.proposed, rnd.accepted)):
            row = rows[alive[i]]
            row.round(proposed, a, emitted, rnd.head_steps)
            finished.append(row.emit(emitted, max_new_tokens, eos_id))
        charge(rows, alive, "verify", clock(device) - rnd.drafted_at)
    return rows


class _Round(NamedTuple):
    """What one speculative round hands back to the batch loop."""

    next_token: torch.Tensor  # [B]: the new x_n
    # the head's next pending inputs: ids [B, T], features [B, T, H], positions [B, T], counts [B]
    pending: tuple
    emitted: list[list[int]]  # per row: the tokens the round emits
    proposed: list[int]  # per row: drafts proposed (chain) or depth the tree reached
    accepted: list[int]  # per row: drafts kept
    head_steps: int
    drafted_at: float  # clock when drafting ended


def _chain_round(
    head,
    embed,
    lm_head,
    hcache,
    kv: TargetKV,
    nxt: torch.Tensor,
    pending: tuple,
    num_drafts: int,
    min_confidence: float,
) -> _Round:
    """Draft a chain, verify [x_n, d_1..d_L] causally, keep the agreeing prefix."""
    device = nxt.device
    drafts, proposed = draft_chain(
        head, embed, lm_head, hcache, *pending, num_drafts, min_confidence
    )  # [B, L], [B]
    head_steps = drafts.shape[1]
    n_prop = proposed.tolist()
    drafts = drafts[:, : max(n_prop)]  # [B, D]: verify only what some row proposes
    t1 = clock(device)
    start = kv.lengths.clone()  # [B]: position of x_n
    block = torch.cat((nxt[:, None], drafts), dim=1)  # [B, D+1]
    feats = kv.forward_block(block)  # [B, D+1, H]
    verified = lm_head(feats).argmax(-1)  # [B, D+1]
    accepted = accepted_prefix(drafts, verified, proposed)  # [B]
    kv.keep(accepted + 1)
    nxt = verified[torch.arange(len(nxt), device=device), accepted]  # [B]: the next x_n
    # the kept positions n..n+a become the head's pending inputs: (f_{n+j}, x_{n+j+1})
    h_pos = start[:, None] + torch.arange(block.shape[1], device=device)  # [B, D+1]
    acc = accepted.tolist()
    return _Round(
        nxt,
        (verified, feats, h_pos, accepted + 1),
        [v[: a + 1] for v, a in zip(verified.tolist(), acc)],
        n_prop,
        acc,
        head_steps,
        t1,
    )


def _tree_round(
    head,
    embed,
    lm_head,
    hcache,
    kv: TargetKV,
    nxt: torch.Tensor,
    pending: tuple,
    num_drafts: int,
    tree: TreeSpec,
) -> _Round:
    """Draft a tree, verify [x_n, nodes] under the tree mask, keep the agreeing path. A row's
    ``proposed`` is the depth its tree reaches (its draft positions)."""
    device = nxt.device
    dt = draft_tree(head, embed, lm_head, hcache, *pending, num_drafts, tree)
    t1 = clock(device)
    start = kv.lengths.clone()  # [B]: position of x_n
    block = torch.cat((nxt[:, None], dt.tokens), dim=1)  # [B, N+1]
    depths = torch.cat((torch.zeros_like(nxt)[:, None], dt.depths), dim=1)  # [B, N+1]
    feats = kv.forward_block(block, depths, dt.mask)  # [B, N+1, H]
    verified = lm_head(feats).argmax(-1)  # [B, N+1]
    accepted, leaf = accept_tree(dt, verified)  # [B], [B]
    rows = torch.arange(len(nxt), device=device)  # [B]
    kv.keep_mask(dt.mask[rows, leaf])
    path = path_indices(dt, leaf, num_drafts + 1)  # [B, K+1]
    h_ids = verified.gather(1, path)  # [B, K+1]: x_{n+j+1} on the kept path
    h_feats = feats.gather(1, path[..., None].expand(-1, -1, feats.shape[-1]))  # [B, K+1, H]
    h_pos = start[:, None] + torch.arange(num_drafts + 1, device=device)  # [B, K+1]
    acc, reach = accepted.tolist(), dt.depths.amax(dim=1).tolist()
    return _Round(
        verified[rows, leaf],
        (h_ids, h_feats, h_pos, accepted + 1),
        [p[: a + 1] for p, a in zip(h_ids.tolist(), acc)],
        reach,
        acc,
        dt.head_steps,
        t1,
    )
