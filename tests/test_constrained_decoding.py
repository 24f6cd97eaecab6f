"""Constrained decoding in the reference engine: lists legal by construction, forced tokens skipped
without forwards, and chains (fake and real heads) token for token equal to plain constrained
greedy."""

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


@pytest.mark.parametrize("left", [2, 1, 0])
@pytest.mark.parametrize("method", ["ar", "skip", "chain"])
def test_exhausted_catalog_ends_the_list_early(target, prompts, method, left):
    """Fewer legal items than k: the list holds them all and ends (with one item every token is
    forced); none: it is just <eos>."""
    kept = sorted(CATALOG.item_to_sid)[:left]
    exclude = [i for i in CATALOG.item_to_sid if i not in kept]
    kwargs = {"ar": {}, "skip": {"skip_forced": True},
              "chain": {"head": tiny_head(target, "padrec", num_steps=K)}}[method]
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
    for kwargs in ({}, {"skip_forced": True}, {"head": tiny_head(target, "padrec")}):
        cut = run(target, prompts, excluded, max_new_tokens=7, **kwargs)
        assert [r.tokens for r in cut] == [r.tokens[:7] for r in constrained]


def test_constrained_refusals(target, prompts, excluded):
    head = tiny_head(target, "padrec")
    with pytest.raises(ValueError, match="trees"):
        run(target, prompts, excluded, head=head, tree=TreeSpec(4))
    with pytest.raises(ValueError, match="min_draft_confidence"):
        run(target, prompts, excluded, head=head, min_draft_confidence=0.5)
    with pytest.raises(ValueError, match="<eos>"):
        generate(target, prompts, max_new_tokens=4, eos_id=None, batch_size=1,
                 constraints=fresh(excluded))
    with pytest.raises(ValueError, match="constraints for"):
        run(target, prompts, excluded[:2])
    with pytest.raises(ValueError, match="skip_forced needs constraints"):
        generate(target, prompts, max_new_tokens=4, eos_id=None, batch_size=1, skip_forced=True)
