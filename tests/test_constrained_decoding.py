"""Constrained decoding in the reference engine: lists legal by construction, forced tokens skipped
without forwards, and chains and trees (fake and real heads) token for token equal to plain
constrained greedy."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.constraint import CatalogTrie, ListConstraint, apply_mask
from padrec_vllm.catalog.tokens import EOS_ID
from padrec_vllm.decoding import TreeSpec, aggregate, generate
from padrec_vllm.decoding.constrained import _best_legal
from padrec_vllm.decoding.constrained_tree import ROOT, _Pool, _Walker, draft_constrained_tree
from padrec_vllm.model.decoding_head import decoding_head
from drafters import TableDrafter
from tiny_models import LAYOUT, tiny_head

K = 3
ITEMS_PER_LIST = 4
MAX_NEW = ITEMS_PER_LIST * LAYOUT.tokens_per_item + 1  # k items with their <sep>, then <eos>

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_catalog(seed: int = 0) -> Catalog:
    """Items over the tiny target's vocabulary, with shared prefixes: 4 first codes, 1-4 second
    codes under each, mostly one third code per prefix and one or two collision codes, so some
    positions hold a choice and some a single legal token."""
    rng = random.Random(seed)
    sids = []
    for a in range(4):
        for b in rng.sample(range(8), rng.randint(1, 4)):
            for c in rng.sample(range(8), rng.choice([1, 1, 2])):
                sids += [(a, b, c, d) for d in range(rng.choice([1, 1, 2]))]
    return Catalog(LAYOUT, {100 + i: sid for i, sid in enumerate(sids)})


CATALOG = tiny_catalog()
TRIE = CatalogTrie.from_catalog(CATALOG)


def exclusions(n: int, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    ids = sorted(CATALOG.item_to_sid)
    return [rng.sample(ids, 3) for _ in range(n)]


def fresh(excluded: list[list[int]], k: int = ITEMS_PER_LIST) -> list[ListConstraint]:
    return [ListConstraint(TRIE, k, e) for e in excluded]


def run(target, prompts, excluded, **kwargs):
    kwargs.setdefault("batch_size", 4)
    kwargs.setdefault("max_new_tokens", MAX_NEW)
    return generate(target, prompts, eos_id=EOS_ID, constraints=fresh(excluded), **kwargs)


def forced_flags(tokens: list[int], exclude: list[int]) -> list[bool]:
    """Per token: was it the only legal one when it came?"""
    state, flags = ListConstraint(TRIE, ITEMS_PER_LIST, exclude), []
    for tok in tokens:
        flags.append(state.forced() is not None)
        state.accept(tok)
    return flags


@pytest.fixture(scope="module")
def excluded(prompts):
    return exclusions(len(prompts))


@pytest.fixture(scope="module")
def constrained(target, prompts, excluded):
    """Plain constrained greedy (``ar``), the reference of every other method."""
    return run(target, prompts, excluded)


def test_catalog_has_forced_and_free_positions():
    flags = [f for item in CATALOG.item_to_sid
             for f in forced_flags(CATALOG.completion_ids([item], False), [])]
    assert any(flags) and not all(flags)


def test_best_legal_token_is_the_masked_argmax():
    """The argmax over legal tokens from the unmasked argmax when it is legal, else masked: the
    same token as masking the logits, ties included (few distinct logit values)."""
    gen, rng = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for _ in range(300):
        logits = torch.randint(0, 4, (2, 40), generator=gen).float()  # [N, V], many ties
        for row in range(2):
            legal = np.sort(rng.choice(40, size=int(rng.integers(1, 6)), replace=False))
            mask = torch.zeros(40, dtype=torch.bool)
            mask[torch.from_numpy(legal)] = True
            want = int(apply_mask(logits[row], mask).argmax())
            assert _best_legal(logits, row, int(logits[row].argmax()), legal) == want


def test_plain_constrained_lists_are_legal_and_full(target, prompts, excluded, constrained):
    for res, exclude in zip(constrained, excluded):
        parsed = CATALOG.parse(res.tokens)
        assert parsed.finished and res.tokens[-1] == EOS_ID
        assert len(parsed.items) == ITEMS_PER_LIST and None not in parsed.items
        assert len(set(parsed.items)) == ITEMS_PER_LIST and not set(parsed.items) & set(exclude)
        assert res.tokens == CATALOG.completion_ids(list(parsed.items), True)
        assert res.tau == 1.0 and res.forced_tokens == 0
        assert res.target_forwards == len(res.tokens) - 1


def test_states_hold_the_lists_afterwards(target, prompts, excluded, constrained):
    states = fresh(excluded)
    generate(target, prompts, max_new_tokens=MAX_NEW, eos_id=EOS_ID, batch_size=2,
             constraints=states)
    assert all(s.is_done() for s in states)
    assert [s.items for s in states] == [list(CATALOG.parse(r.tokens).items) for r in constrained]


def assert_legal_lists(results, excluded):
    """Every list: no invalid item, no repeat, no excluded item, k items, closed by <eos>."""
    for res, exclude in zip(results, excluded):
        parsed = CATALOG.parse(res.tokens)
        assert parsed.finished and res.tokens[-1] == EOS_ID
        assert len(parsed.items) == ITEMS_PER_LIST and None not in parsed.items
        assert len(set(parsed.items)) == ITEMS_PER_LIST and not set(parsed.items) & set(exclude)
        assert res.tokens == CATALOG.completion_ids(list(parsed.items), True)


@pytest.mark.parametrize("left", [2, 1, 0])
@pytest.mark.parametrize("method", ["ar", "skip", "chain", "tree"])
def test_exhausted_catalog_ends_the_list_early(target, prompts, method, left):
    """Fewer legal items than k: the list holds them all and ends (with one item every token is
    forced); none: it is just <eos>."""
    kept = sorted(CATALOG.item_to_sid)[:left]
    exclude = [i for i in CATALOG.item_to_sid if i not in kept]
    kwargs = {"ar": {}, "skip": {"skip_forced": True},
              "chain": {"head": tiny_head(target, "padrec", num_steps=K)},
              "tree": {"head": tiny_head(target, "padrec", num_steps=K),
                       "tree": TreeSpec(6, 2)}}[method]
    results = run(target, prompts, [exclude] * len(prompts), **kwargs)
    for res in results:
        parsed = CATALOG.parse(res.tokens)
        assert parsed.finished and sorted(parsed.items) == kept
        assert res.tokens == CATALOG.completion_ids(list(parsed.items), True)


def test_skip_forced_saves_forwards(target, prompts, excluded, constrained):
    skipped = run(target, prompts, excluded, skip_forced=True)
    assert [r.tokens for r in skipped] == [r.tokens for r in constrained]
    for res, exclude in zip(skipped, excluded):
        forced = sum(forced_flags(res.tokens, exclude)[1:])
        assert res.forced_tokens == forced > 0
        assert res.target_forwards == res.decode_tokens - forced
        assert res.tau > 1.0 and res.plain_forwards == res.target_forwards
    agg = aggregate(skipped)
    assert agg.forced_tokens == sum(r.forced_tokens for r in skipped) and agg.tau > 1.0


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("mode", ["oracle", "wrong", "noisy"])
def test_chain_with_fake_drafters_matches_constrained_greedy(
    target, prompts, excluded, constrained, mode, batch_size
):
    drafter = TableDrafter(prompts, [r.tokens for r in constrained], mode, num_steps=K)
    spec = run(target, prompts, excluded, head=drafter, batch_size=batch_size,
               slot_of_token=LAYOUT.slot_table())
    assert [r.tokens for r in spec] == [r.tokens for r in constrained]
    for res, exclude in zip(spec, excluded):
        flags = forced_flags(res.tokens, exclude)
        choices = len(flags) - 1 - sum(flags[1:])
        assert res.forced_tokens == sum(flags[1:])  # the target's own tokens are never forced
        assert sum(res.acceptance_histogram) == res.target_forwards - res.plain_forwards
        if mode == "oracle":  # every round: K accepted choices and the target's own one
            assert res.target_forwards == math.ceil(choices / (K + 1))
            assert res.tau == res.decode_tokens / math.ceil(choices / (K + 1))
            assert all(a == p for a, p in res.accept_by_pos)
        assert sum(p for _, p in res.accept_by_slot.values()) <= res.draft_tokens
    if mode == "oracle":
        assert aggregate(spec).tau > K + 1  # forced tokens come on top of the choices
    if mode == "wrong":
        assert aggregate(spec).tau < aggregate(
            run(target, prompts, excluded, head=TableDrafter(
                prompts, [r.tokens for r in constrained], "oracle", num_steps=K))).tau


@pytest.mark.parametrize("kind", ["eagle", "padrec"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_chain_with_real_heads_matches_constrained_greedy(
    target, prompts, excluded, constrained, kind, batch_size
):
    head = decoding_head(tiny_head(target, kind, num_steps=K), target)
    spec = run(target, prompts, excluded, head=head, batch_size=batch_size)
    assert [r.tokens for r in spec] == [r.tokens for r in constrained]
    assert all(r.forced_tokens > 0 and r.draft_forwards > 0 for r in spec)


def test_budget_cuts_a_constrained_list(target, prompts, excluded, constrained):
    head = tiny_head(target, "padrec")
    for kwargs in ({}, {"skip_forced": True}, {"head": head},
                   {"head": head, "tree": TreeSpec(5, 2)}):
        cut = run(target, prompts, excluded, max_new_tokens=7, **kwargs)
        assert [r.tokens for r in cut] == [r.tokens[:7] for r in constrained]


def test_constrained_refusals(target, prompts, excluded):
    head = tiny_head(target, "padrec")
    with pytest.raises(ValueError, match="min_draft_confidence"):
        run(target, prompts, excluded, head=head, min_draft_confidence=0.5)
    with pytest.raises(ValueError, match="<eos>"):
        generate(target, prompts, max_new_tokens=4, eos_id=None, batch_size=1,
                 constraints=fresh(excluded))
    with pytest.raises(ValueError, match="constraints for"):
        run(target, prompts, excluded[:2])
    with pytest.raises(ValueError, match="skip_forced needs constraints"):
        generate(target, prompts, max_new_tokens=4, eos_id=None, batch_size=1, skip_forced=True)


# Trees under the constraint: same output as plain constrained greedy, every node legal.

TREES = [TreeSpec(6, 2), TreeSpec(10, 3), TreeSpec(10, 3, min_prob=0.05)]


def assert_tree_accounting(results, excluded):
    for res, exclude in zip(results, excluded):
        flags = forced_flags(res.tokens, exclude)
        # forced tokens on kept paths are skipped; one may be the target's own (tree cut there)
        assert 0 < res.forced_tokens <= sum(flags[1:])
        assert sum(res.acceptance_histogram) == res.target_forwards - res.plain_forwards
        assert res.draft_forwards >= res.target_forwards
        assert all(a <= p for a, p in res.accept_by_pos)
        assert sum(p for _, p in res.accept_by_slot.values()) <= res.draft_tokens


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("mode", ["oracle", "wrong", "noisy", "runner-up"])
def test_tree_with_fake_drafters_matches_constrained_greedy(
    target, prompts, excluded, constrained, mode, batch_size
):
    lists = [r.tokens for r in constrained]
    kwargs = {"batch_size": batch_size, "slot_of_token": LAYOUT.slot_table()}
    spec = run(target, prompts, excluded, head=TableDrafter(prompts, lists, mode, num_steps=K),
               tree=TreeSpec(8, 2), **kwargs)
    assert [r.tokens for r in spec] == lists
    assert_legal_lists(spec, excluded)
    assert_tree_accounting(spec, excluded)
    chain = run(target, prompts, excluded, head=TableDrafter(prompts, lists, mode, num_steps=K),
                **kwargs)
    if mode == "runner-up":  # right token second: the chain keeps only forced tokens, a tree more
        assert aggregate(spec).tau > aggregate(chain).tau


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("mode", ["oracle", "runner-up"])
def test_top1_constrained_tree_is_the_chain(target, prompts, excluded, constrained, mode,
                                            batch_size):
    """One child per node and room for every node: the tree is the constrained chain (K choices,
    forced runs between them and after the K-th), with the same rounds and counts.
    (Drafters without ties among legal tokens: the chain takes the first of tied tokens, the
    tree's top-k any.)"""
    lists = [r.tokens for r in constrained]
    kwargs = {"batch_size": batch_size, "slot_of_token": LAYOUT.slot_table()}
    chain = run(target, prompts, excluded, head=TableDrafter(prompts, lists, mode, num_steps=K),
                **kwargs)
    tree = run(target, prompts, excluded, head=TableDrafter(prompts, lists, mode, num_steps=K),
               tree=TreeSpec(40, 1), **kwargs)
    for c, t in zip(chain, tree):
        assert t.tokens == c.tokens and t.target_forwards == c.target_forwards
        assert t.accept_by_pos == c.accept_by_pos and t.accept_by_slot == c.accept_by_slot
        assert t.forced_tokens == c.forced_tokens
        if batch_size == 1:  # in a batch the chain's rows step in lockstep, the tree's levels too
            # the chain stops its head at <eos>; the tree still steps through the list's last
            # forced run (a few head steps per list, never a different token)
            assert c.draft_forwards <= t.draft_forwards <= c.draft_forwards + 2 * (K + 1)


@pytest.mark.parametrize("spec", TREES)
@pytest.mark.parametrize("kind", ["eagle", "padrec"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_tree_with_real_heads_matches_constrained_greedy(
    target, prompts, excluded, constrained, kind, batch_size, spec
):
    head = decoding_head(tiny_head(target, kind, num_steps=K), target)
    res = run(target, prompts, excluded, head=head, batch_size=batch_size, tree=spec,
              slot_of_token=LAYOUT.slot_table())
    assert [r.tokens for r in res] == [r.tokens for r in constrained]
    assert_legal_lists(res, excluded)
    assert_tree_accounting(res, excluded)


def test_tree_nodes_are_the_top_legal_tokens(target, prompts, constrained):
    """Drafting alone, a head that prefers illegal tokens ("wrong", and "runner-up" whose first
    choice is often illegal): every node is legal after its parent's path; a node gets at most
    top_k children, one when its next token is forced, and a choice node's children are the
    head's best legal tokens in order."""
    spec = TreeSpec(30, 3)
    for mode in ("wrong", "runner-up"):
        drafter = TableDrafter(prompts, [r.tokens for r in constrained], mode, num_steps=K)
        prompt = prompts[0]
        state = ListConstraint(TRIE, ITEMS_PER_LIST, [])
        n = len(prompt)
        ids = torch.tensor([prompt[1:] + [constrained[0].tokens[0]]])  # [1, n]: x_{p+1}
        feats = torch.zeros(1, n, LAYOUT.vocab_size)  # [1, n, V]
        state.accept(constrained[0].tokens[0])
        tail = [constrained[0].tokens[0]] + state.forced_run()
        for tok in tail[1:]:
            state.accept(tok)
        pool = _Pool(_Walker(state, tail[1:]))
        pending = (ids, feats, torch.arange(n)[None], torch.tensor([n]))
        cache = drafter.new_cache(1, 64)
        tree, src = draft_constrained_tree(drafter, None, None, cache, pending, [pool], K, spec,
                                           12, 5, [len(tail) - 1])
        nodes = [q for q, ok in zip(src[0], tree.valid[0].tolist()) if ok]
        assert len(nodes) == min(spec.nodes + len(tail) - 1, len(pool.tok))
        assert [pool.tok[q] for q in nodes[: len(tail) - 1]] == tail[1:]
        parents = [pool.parent[q] for q in nodes]
        assert any(parents.count(p) > 1 for p in parents)  # a choice with several children
        assert not all(pool.choice[q] for q in nodes[len(tail) - 1:])  # forced nodes in the tree
        for q in nodes:
            par = pool.parent[q]
            legal = ListConstraint(TRIE, ITEMS_PER_LIST, [])
            for tok in (tail[0],) + pool.path_of(par):
                legal.accept(tok)
            assert pool.tok[q] in legal.allowed().tolist()
            siblings = [c for c in range(len(pool.tok)) if pool.parent[c] == par]
            assert len(siblings) <= min(spec.top_k, len(legal.allowed()))
            assert pool.choice[q] == (len(legal.allowed()) > 1)
        for q in [ROOT] + nodes:
            kids = [c for c in range(len(pool.tok)) if pool.parent[c] == q]
            assert len({pool.tok[c] for c in kids}) == len(kids)
            assert [pool.score[c] for c in kids] == sorted((pool.score[c] for c in kids),
                                                           reverse=True)
