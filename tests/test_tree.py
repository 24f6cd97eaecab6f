"""Tree speculative decoding: lossless with real heads, equal to the chain when the tree is a
chain, and able to accept a path the chain never would (a drafter whose right token is always its
second choice)."""

from __future__ import annotations

import pytest
import torch

from padrec_vllm.decoding import aggregate, generate, identical_output_rate
from padrec_vllm.decoding.tree import DraftTree, TreeSpec, accept_tree, path_indices
from padrec_vllm.model.decoding_head import decoding_head
from drafters import TableDrafter
from tiny_models import LAYOUT, assert_close_to_rounding, tiny_head

K = 3

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("form", ["head", "decoding"])
@pytest.mark.parametrize("kind", ["eagle", "padrec"])
@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("spec", [TreeSpec(5, 2), TreeSpec(9, 3), TreeSpec(9, 3, min_prob=0.01)])
def test_tree_is_lossless_with_real_heads(target, prompts, reference, kind, batch_size, spec,
                                          form):
    row = reference[0]
    eos = next(tok for i, tok in enumerate(row) if i >= 5 and tok not in row[:i])
    head = tiny_head(target, kind, num_steps=K)
    if form == "decoding":
        head = decoding_head(head, target)
    plain = generate(target, prompts, max_new_tokens=20, eos_id=eos, batch_size=batch_size)
    tree = generate(target, prompts, max_new_tokens=20, eos_id=eos, batch_size=batch_size,
                    head=head, tree=spec)
    assert identical_output_rate(tree, plain) == 1.0
    assert tree[0].tokens[-1] == eos
    assert all(r.draft_forwards == K * r.target_forwards for r in tree)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_top1_tree_is_the_chain(target, prompts, reference, batch_size):
    """A tree of one child per node is a chain: same tokens, rounds and acceptance counts."""
    kwargs = {"max_new_tokens": 20, "eos_id": None, "batch_size": batch_size,
              "slot_of_token": LAYOUT.slot_table()}
    chain = generate(target, prompts, head=TableDrafter(prompts, reference, "noisy"), **kwargs)
    tree = generate(target, prompts, head=TableDrafter(prompts, reference, "noisy"),
                    tree=TreeSpec(K, 1), **kwargs)
    assert [r.tokens for r in chain] == [c[:20] for c in reference]
    assert 1.0 < aggregate(chain).tau < K + 1  # partial acceptance
    for c, t in zip(chain, tree):
        assert t.tokens == c.tokens and t.tau == c.tau and t.target_forwards == c.target_forwards
        assert t.accept_by_pos == c.accept_by_pos and t.draft_forwards == c.draft_forwards
        accepted = [sum(a for a, _ in r.accept_by_slot.values()) for r in (t, c)]
        assert accepted[0] == accepted[1]


def test_tree_accepts_the_second_choices(target, prompts, reference):
    """Right token always second: the chain accepts nothing; a tree of two children per node
    holds the right path to depth 2 (the beam of 2 keeps the first choices at depth 2, so depth 3
    is never right), so every round keeps 2 drafts and tau is 3."""
    rounds = 4
    max_new = 1 + rounds * 3
    kwargs = {"max_new_tokens": max_new, "eos_id": None, "batch_size": 4}
    chain = generate(target, prompts, head=TableDrafter(prompts, reference, "runner-up"), **kwargs)
    drafter = TableDrafter(prompts, reference, "runner-up")
    tree = generate(target, prompts, head=drafter, tree=TreeSpec(30, 2), **kwargs)
    assert [r.tokens for r in tree] == [r.tokens for r in chain] == [c[:max_new] for c in reference]
    assert aggregate(chain).tau == 1.0
    for r in tree:
        assert r.tau == 3.0 and r.target_forwards == rounds and r.draft_forwards == rounds * K
        assert r.accept_by_pos == [(rounds, rounds), (rounds, rounds), (0, rounds)]
    # one call per depth; the step index is depth + 1
    assert drafter.steps == list(range(1, K + 1)) * rounds


def test_min_prob_trims_the_doubtful_branches(target, prompts, reference):
    """Runner-up drafter (right token p ~ 0.27, wrong ~ 0.73): past the K best nodes (the chain of
    first choices), a path probability floor of 0.5 drops every right node, 0.05 keeps the right
    path to depth 2."""
    kwargs = {"max_new_tokens": 13, "eos_id": None, "batch_size": 4}
    for floor, tau in ((0.5, 1.0), (0.05, 3.0)):
        tree = generate(target, prompts, head=TableDrafter(prompts, reference, "runner-up"),
                        tree=TreeSpec(30, 2, min_prob=floor), **kwargs)
        assert [r.tokens for r in tree] == [c[:13] for c in reference]
        assert all(r.tau == tau for r in tree)


def _hand_tree() -> DraftTree:
    """root -> a(1) -> c(3); root -> b(2) -> d(4), e(5); tokens 11..15."""
    parents = torch.tensor([[0, 0, 1, 2, 2]])
    mask = torch.eye(6, dtype=torch.bool)[None].clone()
    for i in range(1, 6):
        mask[0, i] |= mask[0, parents[0, i - 1]]
    return DraftTree(torch.tensor([[11, 12, 13, 14, 15]]), parents,
                     torch.tensor([[1, 1, 2, 2, 2]]), mask, torch.ones(1, 5, dtype=torch.bool),
                     head_steps=3)


@pytest.mark.parametrize(
    "verified, accepted, leaf, path",
    [
        ([12, 0, 15, 0, 0, 0], 2, 5, [0, 2, 5, 5]),  # b then e
        ([11, 13, 0, 0, 0, 0], 2, 3, [0, 1, 3, 3]),  # a then c
        ([12, 13, 0, 0, 0, 0], 1, 2, [0, 2, 2, 2]),  # b, then the target wants none of d, e
        ([99, 13, 14, 0, 0, 0], 0, 0, [0, 0, 0, 0]),  # nothing after the root
    ],
)
def test_accept_tree_walks_the_agreeing_path(verified, accepted, leaf, path):
    tree = _hand_tree()
    acc, lf = accept_tree(tree, torch.tensor([verified]))
    assert acc.tolist() == [accepted] and lf.tolist() == [leaf]
    assert path_indices(tree, lf, 4).tolist() == [path]


@pytest.mark.parametrize("form", ["head", "decoding"])
def test_tree_attention_sees_prefix_and_ancestors_only(target, form):
    """A head query in a tree equals the same query made as a chain over its ancestors."""
    head = tiny_head(target, "padrec", num_steps=K)
    if form == "decoding":
        head = decoding_head(head, target)
    embed = target.get_input_embeddings()
    h = target.config.hidden_size
    torch.manual_seed(0)
    ids, feats = torch.randint(3, 30, (1, 6)), torch.randn(1, 6, h)  # [1, 6], [1, 6, H]
    prefix = (ids[:, :4], feats[:, :4], torch.arange(4)[None])  # [1, 4], [1, 4, H], [1, 4]
    with torch.inference_mode():
        chain = head.new_cache(1, 16)
        head(*prefix, step=1, embed=embed, cache=chain)
        want = head(ids[:, 4:6], feats[:, 4:6], torch.tensor([[4, 5]]), step=2, embed=embed,
                    cache=chain)
        tree_cache = head.new_cache(1, 16)
        head(*prefix, step=1, embed=embed, cache=tree_cache)
        scratch = tree_cache.tree_scratch(3)
        # scratch 0: a sibling the queries must not see; 1: the node at position 4; 2: position 5
        noise = scratch.at(torch.tensor([0]), torch.tensor([[[True, False, False]]]),
                           torch.tensor([4]))
        head(ids[:, 5:6], torch.randn(1, 1, h), torch.tensor([[4]]), step=2, embed=embed,
             cache=tree_cache, tree=noise)
        vis = torch.tensor([[[False, True, False], [False, True, True]]])
        place = scratch.at(torch.tensor([1, 2]), vis, torch.tensor([4]))
        got = head(ids[:, 4:6], feats[:, 4:6], torch.tensor([[4, 5]]), step=2, embed=embed,
                   cache=tree_cache, tree=place)
    # the same keys in another layout (cache + scratch against cache): other sum orders only.
    # Sums along the way: fc (2H), q/k/v (H), scores (head_dim 16), weights x values (16 cached
    # slots + 3 scratch entries), o_proj (H), MLP gate/up (H), down_proj (2H)
    assert_close_to_rounding(got, want, 2 * h + h + 16 + 19 + h + h + 2 * h)


def test_tree_argument_errors(target, prompts):
    head = tiny_head(target, "padrec", num_steps=K)
    with pytest.raises(ValueError, match="tree drafting needs a head"):
        generate(target, prompts, max_new_tokens=4, eos_id=None, batch_size=1, tree=TreeSpec(4))
    with pytest.raises(ValueError, match="excludes min_draft_confidence"):
        generate(target, prompts, max_new_tokens=4, eos_id=None, batch_size=1, head=head,
                 tree=TreeSpec(4), min_draft_confidence=0.5)
    with pytest.raises(ValueError, match="nodes >= 1"):
        TreeSpec(0)
    with pytest.raises(ValueError, match="min_prob"):
        TreeSpec(4, 2, 1.0)
