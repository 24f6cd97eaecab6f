"""The catalog constraint: trie arrays, per-request legality, rollback, batched masks."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.constraint import (
    CatalogTrie,
    ListConstraint,
    allowed_mask,
    apply_mask,
    fill_mask,
)
from padrec_vllm.catalog.tokens import EOS_ID, SEP_ID, TokenLayout

LAYOUT = TokenLayout((3, 3, 2))
# a_0 holds items 10, 11 (under a_0 b_0) and 12; a_1 holds 13; a_2 holds 14
SMALL = Catalog(LAYOUT, {10: (0, 0, 0), 11: (0, 0, 1), 12: (0, 1, 0), 13: (1, 2, 0), 14: (2, 0, 0)})


def tok(level: int, code: int) -> int:
    return LAYOUT.token_id(level, code)


def random_catalog(seed: int, num_items: int, layout: TokenLayout) -> Catalog:
    rng = random.Random(seed)
    sids: set[tuple[int, ...]] = set()
    while len(sids) < num_items:
        sids.add(tuple(rng.randrange(s) for s in layout.codebook_sizes))
    return Catalog(layout, {100 + 7 * i: sid for i, sid in enumerate(sorted(sids, key=str))})


def snapshot(c: ListConstraint) -> tuple:
    lives = tuple(c.live(n) for n in range(c.trie.num_nodes))
    dead = {p: frozenset(s) for p, s in c._dead.items()}
    return c.phase, c.node, tuple(c.items), dict(c._removed), dead, lives, c.allowed().tolist()


def test_trie_arrays_match_the_catalog():
    cat = random_catalog(3, 60, TokenLayout((4, 5, 3, 2)))
    trie = CatalogTrie.from_catalog(cat)
    prefixes = {()} | {
        tuple(cat.item_token_ids(i)[:d]) for i in cat.item_to_sid for d in range(1, 5)
    }
    assert trie.num_nodes == len(prefixes) and trie.items_below[0] == 60
    for idx, item in enumerate(trie.item_ids.tolist()):
        path, tokens = trie.item_path[idx], cat.item_token_ids(item)
        assert trie.token_of[path[1:]].tolist() == tokens and path[0] == 0
        assert trie.item_of_node[path[-1]] == idx
        for d, node in enumerate(path.tolist()):
            below = [i for i in cat.item_to_sid if cat.item_token_ids(i)[:d] == tokens[:d]]
            assert trie.items_below[node] == len(below)
            kids = trie.token_of[trie.child_ptr[node] : trie.child_ptr[node + 1]].tolist()
            assert kids == sorted({cat.item_token_ids(i)[d] for i in below} if d < 4 else set())


def test_live_counts_after_exclusions():
    trie = CatalogTrie.from_catalog(SMALL)
    c = ListConstraint(trie, k=3, exclude=[10, 13, 10, 999])  # repeat and unknown id: ignored
    root, a0, a0b0 = trie.item_path[trie.index_of[10]][:3].tolist()
    a1 = trie.item_path[trie.index_of[13]][1]
    assert (c.live(root), c.live(a0), c.live(a0b0), c.live(a1)) == (3, 2, 1, 0)
    free = ListConstraint(trie, k=3)  # the counts are per request, the trie is unchanged
    assert [free.live(n) for n in range(trie.num_nodes)] == trie.items_below.tolist()
    assert trie.items_below[[root, a0, a0b0, a1]].tolist() == [5, 3, 2, 1]


def test_dead_prefixes_are_masked():
    trie = CatalogTrie.from_catalog(SMALL)
    c = ListConstraint(trie, k=2, exclude=[10, 11, 13])
    assert c.allowed().tolist() == [tok(0, 0), tok(0, 2)]  # a_1's only item is excluded
    c.accept(tok(0, 0))
    assert c.allowed().tolist() == [tok(1, 1)] and c.forced() == tok(1, 1)  # a_0 b_0 is dead
    with pytest.raises(ValueError, match=f"token {tok(1, 0)} "):
        c.accept(tok(1, 0))


def test_sep_only_after_a_complete_item_and_forced_there():
    c = ListConstraint(CatalogTrie.from_catalog(SMALL), k=2)
    for t in (tok(0, 0), tok(1, 0)):
        assert SEP_ID not in c.allowed()
        c.accept(t)
    assert c.forced() is None and c.allowed().tolist() == [tok(2, 0), tok(2, 1)]
    c.accept(tok(2, 1))
    assert c.allowed().tolist() == [SEP_ID] and c.forced() == SEP_ID and c.items == [11]
    with pytest.raises(ValueError, match=f"token {tok(0, 1)} "):
        c.accept(tok(0, 1))
    c.accept(SEP_ID)
    assert SEP_ID not in c.allowed() and c.phase == "item" and c.node == 0


def test_eos_only_once_the_list_is_full():
    c = ListConstraint(CatalogTrie.from_catalog(SMALL), k=2)
    for item in (13, 11):
        assert EOS_ID not in c.allowed()
        for t in SMALL.item_token_ids(item):
            c.accept(t)
            assert EOS_ID not in c.allowed()
        c.accept(SEP_ID)
    assert c.allowed().tolist() == [EOS_ID] and c.forced() == EOS_ID and not c.is_done()
    c.accept(EOS_ID)
    assert c.is_done() and c.allowed().tolist() == [] and c.forced() is None
    with pytest.raises(ValueError, match=f"token {EOS_ID} "):
        c.accept(EOS_ID)


def test_eos_when_the_catalog_is_exhausted_before_k():
    trie = CatalogTrie.from_catalog(SMALL)
    c = ListConstraint(trie, k=10, exclude=[10, 11, 12])
    assert c.allowed().tolist() == [tok(0, 1), tok(0, 2)]
    c.accept(tok(0, 1))
    run = c.forced_run()  # item 13 ends, then the last legal item 14, then <eos>
    assert run == [tok(1, 2), tok(2, 0), SEP_ID] + SMALL.completion_ids([14], finished=True)
    for t in run[:3]:
        c.accept(t)
    assert c.allowed().tolist() == [tok(0, 2)]  # one legal item left, no <eos> yet
    for t in run[3:-1]:
        c.accept(t)
    assert c.allowed().tolist() == [EOS_ID] and c.items == [13, 14]
    assert ListConstraint(trie, k=1, exclude=SMALL.item_to_sid).forced_run() == [EOS_ID]


def test_every_token_forced_in_a_one_item_and_a_chain_catalog():
    one = Catalog(LAYOUT, {5: (2, 1, 0)})
    c = ListConstraint(CatalogTrie.from_catalog(one), k=3)
    assert c.forced_run() == one.completion_ids([5], finished=True)
    chain = Catalog(LAYOUT, {1: (0, 0, 0), 2: (0, 0, 1)})  # a_0 b_0 then c_0 or c_1
    c = ListConstraint(CatalogTrie.from_catalog(chain), k=2, exclude=[2])
    assert c.forced_run() == chain.completion_ids([1], finished=True)
    c = ListConstraint(CatalogTrie.from_catalog(chain), k=2)
    assert c.forced_run() == [tok(0, 0), tok(1, 0)]  # then a choice
    for t in c.forced_run() + [tok(2, 1)]:
        c.accept(t)
    assert c.forced_run() == [SEP_ID] + chain.item_token_ids(1) + [SEP_ID, EOS_ID]


def test_forced_run_leaves_the_state_unchanged_and_respects_the_limit():
    c = ListConstraint(CatalogTrie.from_catalog(SMALL), k=2, exclude=[10, 11, 12, 13])
    before = snapshot(c)
    assert c.forced_run(limit=2) == [tok(0, 2), tok(1, 0)]
    assert c.forced_run() == SMALL.completion_ids([14], finished=True)
    assert snapshot(c) == before


def test_accept_forced_equals_forced_run_then_accept():
    cat = random_catalog(3, 40, TokenLayout((3, 4, 2, 2)))
    trie, rng = CatalogTrie.from_catalog(cat), random.Random(1)
    c, ref = ListConstraint(trie, k=6), ListConstraint(trie, k=6)
    while not c.is_done():
        run = ref.forced_run()
        for t in run:
            ref.accept(t)
        assert c.accept_forced() == run and snapshot(c) == snapshot(ref)
        if not c.is_done():
            t = rng.choice(c.allowed().tolist())
            c.accept(t)
            ref.accept(t)
    assert c.accept_forced() == []


def test_rollback_restores_the_state_exactly():
    cat = random_catalog(1, 40, TokenLayout((3, 4, 2, 2)))
    trie, rng = CatalogTrie.from_catalog(cat), random.Random(0)
    excluded = rng.sample(sorted(cat.item_to_sid), 5)
    c = ListConstraint(trie, k=6, exclude=excluded)
    while not c.is_done():
        cp, before = c.checkpoint(), snapshot(c)
        for _ in range(rng.randrange(1, 12)):
            if c.is_done():
                break
            c.accept(rng.choice(c.allowed().tolist()))
        assert snapshot(c) != before
        c.rollback(cp)
        assert snapshot(c) == before
        c.rollback(cp)  # a no-op at the mark itself
        c.accept(rng.choice(c.allowed().tolist()))
    assert len(c.items) == 6
    with pytest.raises(ValueError, match="checkpoint"):
        c.rollback(c.checkpoint() + 1)
    c.rollback(0)
    assert snapshot(c) == snapshot(ListConstraint(trie, k=6, exclude=excluded))


def test_batched_mask_equals_the_allowed_sets():
    trie = CatalogTrie.from_catalog(SMALL)
    states = [ListConstraint(trie, k=1, exclude=[14]) for _ in range(5)]
    for steps, s in zip(range(5), states):
        for _ in range(steps):
            s.accept(s.allowed()[-1])
    states[4].accept(EOS_ID)  # done: all False
    vocab = LAYOUT.vocab_size + 3  # the model's vocabulary may be padded
    mask = allowed_mask(states, vocab)  # [5, V]
    assert mask.shape == (5, vocab) and mask.dtype == torch.bool
    for b, s in enumerate(states):
        assert torch.nonzero(mask[b]).flatten().tolist() == s.allowed().tolist()
    assert not mask[4].any() and mask.any(dim=1)[:4].all()
    out = torch.ones(5, vocab, dtype=torch.bool)
    assert torch.equal(fill_mask(states, out), mask)
    logits = torch.randn(5, vocab)
    masked = apply_mask(logits, mask)
    assert torch.equal(masked[mask], logits[mask]) and torch.isneginf(masked[~mask]).all()


def test_k_must_be_positive():
    with pytest.raises(ValueError, match="k >= 1"):
        ListConstraint(CatalogTrie.from_catalog(SMALL), k=0)


@pytest.mark.parametrize("seed", range(4))
def test_greedy_decoding_under_the_constraint_gives_valid_distinct_lists(seed):
    layout = TokenLayout((4, 3, 3, 2))
    cat = random_catalog(seed, 25, layout)
    trie, rng = CatalogTrie.from_catalog(cat), random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    ids = sorted(cat.item_to_sid)
    ks = [1, 3, 10, 30]  # 30 > the legal items: the catalog runs out first
    excluded = [set(rng.sample(ids, rng.randrange(0, 8))) | {-1} for _ in ks]
    states = [ListConstraint(trie, k, exclude=ex) for k, ex in zip(ks, excluded)]
    out: list[list[int]] = [[] for _ in ks]
    while not all(s.is_done() for s in states):
        live = [b for b, s in enumerate(states) if not s.is_done()]
        logits = torch.randn(len(live), layout.vocab_size, generator=gen)  # [B', V]
        nxt = apply_mask(logits, allowed_mask([states[b] for b in live], layout.vocab_size))
        for b, t in zip(live, nxt.argmax(dim=-1).tolist()):
            states[b].accept(t)
            out[b].append(t)
    for k, ex, toks, s in zip(ks, excluded, out, states):
        parsed = cat.parse(toks)
        assert parsed.finished and parsed.num_invalid == 0 and toks[-2:] == [SEP_ID, EOS_ID]
        assert len(set(parsed.items)) == len(parsed.items) == min(k, len(set(ids) - ex))
        assert not set(parsed.items) & ex and list(parsed.items) == s.items
        assert np.array_equal(cat.completion_ids(s.items, finished=True), toks)
