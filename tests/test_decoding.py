"""Reference engine: greedy against a cache-free loop, speculative decoding lossless against greedy,
and its figures (tau, acceptance per position and slot, step indices) with drafters whose
behaviour is known exactly."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from padrec_vllm.decoding import TreeSpec, aggregate, generate, identical_output_rate
from drafters import TableDrafter
from tiny_models import LAYOUT, tiny_head, tiny_target

K = 3


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def eos(reference):
    """A token that first appears mid-way in request 0's greedy output: it ends request 0 there."""
    row = reference[0]
    return next(tok for i, tok in enumerate(row) if i >= 5 and tok not in row[:i])


class StepSpy:
    """Wraps a drafter and records the draft step index of every call."""

    def __init__(self, inner) -> None:
        self.inner, self.steps = inner, []

    def __call__(self, *args, step, **kwargs):
        self.steps.append(step)
        return self.inner(*args, step=step, **kwargs)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _naive_greedy(target, prompt, max_new_tokens, eos_id):
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            tok = int(target(input_ids=torch.tensor([seq])).logits[0, -1].argmax())
            seq.append(tok)
            if tok == eos_id:
                break
    return seq[len(prompt) :]


def _check_stops(results, max_new_tokens, eos_id):
    for r in results:
        assert 1 <= len(r.tokens) <= max_new_tokens
        assert eos_id not in r.tokens[:-1]
        assert r.tokens[-1] == eos_id or len(r.tokens) == max_new_tokens


@pytest.mark.parametrize("batch_size", [1, 4])
def test_greedy_matches_cache_free_loop(target, prompts, eos, batch_size):
    results = generate(target, prompts, max_new_tokens=16, eos_id=eos, batch_size=batch_size)
    assert [r.tokens for r in results] == [_naive_greedy(target, p, 16, eos) for p in prompts]
    _check_stops(results, 16, eos)
    assert results[0].tokens[-1] == eos
    assert all(r.tau == 1.0 and r.draft_forwards == 0 for r in results if len(r.tokens) > 1)


@pytest.mark.parametrize("kind", ["eagle", "padrec"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_speculative_is_lossless_with_real_heads(target, prompts, eos, kind, batch_size):
    head = tiny_head(target, kind, num_steps=K)
    plain = generate(target, prompts, max_new_tokens=20, eos_id=eos, batch_size=batch_size)
    spec = generate(
        target, prompts, max_new_tokens=20, eos_id=eos, batch_size=batch_size, head=head
    )
    assert identical_output_rate(spec, plain) == 1.0
    _check_stops(spec, 20, eos)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_speculative_is_lossless_with_partial_acceptance(
    target, prompts, reference, eos, batch_size
):
    drafter = TableDrafter(prompts, reference, "noisy")
    plain = generate(target, prompts, max_new_tokens=20, eos_id=eos, batch_size=batch_size)
    spec = generate(
        target, prompts, max_new_tokens=20, eos_id=eos, batch_size=batch_size, head=drafter
    )
    assert [r.tokens for r in spec] == [r.tokens for r in plain]
    _check_stops(spec, 20, eos)
    agg = aggregate(spec)
    assert 1.0 < agg.tau < K + 1  # partial acceptance, so the rollback paths ran
    assert len({r.target_forwards for r in spec}) > 1


def test_oracle_drafter_gives_tau_k_plus_one(target, prompts, reference):
    rounds = 4
    max_new = 1 + rounds * (K + 1)  # prefill emits 1 token, each round K+1: no clipping
    spec = generate(
        target,
        prompts,
        max_new_tokens=max_new,
        eos_id=None,
        batch_size=4,
        head=TableDrafter(prompts, reference, "oracle"),
        slot_of_token=LAYOUT.slot_tensor(),
    )
    assert [r.tokens for r in spec] == [c[:max_new] for c in reference]
    for r in spec:
        assert r.tau == K + 1
        assert r.target_forwards == rounds and r.draft_forwards == rounds * K
        assert r.accept_by_pos == [(rounds, rounds)] * K
        # every draft was judged and accepted; slots are those of the drafted tokens
        drafted = [tok for i in range(rounds) for tok in r.tokens[1 + i * (K + 1) :][:K]]
        want: dict[int, tuple[int, int]] = {}
        for tok in drafted:
            n = want.get(LAYOUT.decode_id(tok)[0], (0, 0))[0] + 1
            want[LAYOUT.decode_id(tok)[0]] = (n, n)
        assert r.accept_by_slot == dict(sorted(want.items()))
    assert aggregate(spec).tau == K + 1


def test_wrong_drafter_gives_tau_one(target, prompts, reference):
    spec = generate(
        target,
        prompts,
        max_new_tokens=10,
        eos_id=None,
        batch_size=4,
        head=TableDrafter(prompts, reference, "wrong"),
        slot_of_token=LAYOUT.slot_table(),
    )
    assert [r.tokens for r in spec] == [c[:10] for c in reference]
    for r in spec:
        assert r.tau == 1.0 and r.target_forwards == 9
        assert r.accept_by_pos == [(0, 9)] * K
        # only the first draft of a round is judged, under the slot of the target's token there
        judged = Counter(LAYOUT.decode_id(t)[0] for t in r.tokens[1:])
        assert r.accept_by_slot == {s: (0, n) for s, n in sorted(judged.items())}


def test_draft_steps_run_1_to_k_each_round(target, prompts):
    spy = StepSpy(tiny_head(target, "padrec", num_steps=K))
    results = generate(target, prompts[:2], max_new_tokens=9, eos_id=None, batch_size=1, head=spy)
    rounds = sum(r.target_forwards for r in results)
    assert rounds > 0 and spy.steps == list(range(1, K + 1)) * rounds


@pytest.mark.parametrize("batch_size", [1, 4])
def test_confidence_threshold_ends_chains_at_the_doubtful_draft(
    target, prompts, reference, batch_size
):
    """A drafter whose confidence tells right from wrong: with the threshold between the two, each
    chain stops where the first wrong draft would have been, so the same drafts are accepted with
    fewer head steps, every proposed draft is accepted, and the output is still the target's."""
    drafter = TableDrafter(prompts, reference, "hedged")
    kwargs = dict(max_new_tokens=20, eos_id=None, batch_size=batch_size, head=drafter)
    fixed = generate(target, prompts, **kwargs)
    gated = generate(target, prompts, min_draft_confidence=0.5, **kwargs)
    assert [r.tokens for r in gated] == [r.tokens for r in fixed] == [c[:20] for c in reference]
    assert 1.0 < aggregate(fixed).tau < K + 1
    for f, g in zip(fixed, gated):
        assert g.tau == f.tau and g.target_forwards == f.target_forwards
        assert all(a == p for a, p in g.accept_by_pos)  # only right drafts are proposed
        assert sum(p for _, p in g.accept_by_pos) < sum(p for _, p in f.accept_by_pos)
    assert sum(g.draft_forwards for g in gated) < sum(f.draft_forwards for f in fixed)
    assert fixed[0].draft_forwards == K * fixed[0].target_forwards


@pytest.mark.parametrize("kind", ["eagle", "padrec"])
@pytest.mark.parametrize("batch_size", [1, 4])
def test_confidence_threshold_is_lossless_with_real_heads(target, prompts, eos, kind, batch_size):
    head = tiny_head(target, kind, num_steps=K)
    plain = generate(target, prompts, max_new_tokens=20, eos_id=eos, batch_size=batch_size)
    for threshold in (
        1.5 / LAYOUT.vocab_size,
        0.9,
    ):  # around a random head's confidence, and above it
        spec = generate(
            target,
            prompts,
            max_new_tokens=20,
            eos_id=eos,
            batch_size=batch_size,
            head=head,
            min_draft_confidence=threshold,
        )
        assert identical_output_rate(spec, plain) == 1.0
        _check_stops(spec, 20, eos)
    assert all(r.tau == 1.0 for r in spec if len(r.tokens) > 1)  # 0.9: nothing proposed


def test_confidence_threshold_range(target, prompts):
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="min_draft_confidence"):
            generate(
                target,
                prompts,
                max_new_tokens=4,
                eos_id=None,
                batch_size=1,
                min_draft_confidence=bad,
            )


def test_clipping_at_budget_and_eos(target, prompts, reference):
    oracle = TableDrafter(prompts, reference, "oracle")
    # budget 6: prefill 1 + a full round of 4 + 1 of the next round's 4
    spec = generate(target, prompts, max_new_tokens=6, eos_id=None, batch_size=4, head=oracle)
    assert [r.tokens for r in spec] == [c[:6] for c in reference]
    assert all(r.target_forwards == 2 for r in spec)
    # eos in the middle of an accepted run ends the request there
    row = reference[1]
    stop = next(tok for i, tok in enumerate(row) if i >= 2 and tok not in row[:i])
    spec = generate(target, prompts[1:2], max_new_tokens=20, eos_id=stop, batch_size=1, head=oracle)
    assert spec[0].tokens == row[: row.index(stop) + 1]


def test_aggregate_sums(target, prompts, reference):
    spec = generate(
        target,
        prompts,
        max_new_tokens=12,
        eos_id=None,
        batch_size=2,
        head=TableDrafter(prompts, reference, "noisy"),
        slot_of_token=LAYOUT.slot_table(),
    )
    agg = aggregate(spec)
    assert agg.num_requests == 4 and agg.num_tokens == sum(len(r.tokens) for r in spec)
    assert agg.target_forwards == sum(r.target_forwards for r in spec)
    assert agg.tau == pytest.approx((agg.num_tokens - 4) / agg.target_forwards)
    assert agg.accept_by_pos[0][1] == agg.target_forwards
    assert agg.accept_by_pos == [
        tuple(map(sum, zip(*(r.accept_by_pos[j] for r in spec)))) for j in range(K)
    ]
    assert agg.accept_rate_by_pos == [a / p for a, p in agg.accept_by_pos]
    assert agg.accept_rate_by_slot == {s: a / p for s, (a, p) in agg.accept_by_slot.items()}
    assert sum(p for _, p in agg.accept_by_slot.values()) == sum(
        p for r in spec for _, p in r.accept_by_slot.values()
    )
    assert agg.total_s == pytest.approx(sum(r.total_s for r in spec))
    assert all(r.prefill_s > 0 and r.draft_s > 0 and r.verify_s > 0 for r in spec)


@pytest.mark.gpu
def test_cuda_engine_is_lossless_and_matches_cpu(target, prompts, reference):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gpu = tiny_target().to("cuda")
    plain = generate(gpu, prompts, max_new_tokens=24, eos_id=None, batch_size=4)
    assert [r.tokens for r in plain] == reference
    for kind in ("eagle", "padrec"):
        head = tiny_head(gpu, kind, num_steps=K).to("cuda")
        spec = generate(gpu, prompts, max_new_tokens=24, eos_id=None, batch_size=4, head=head)
        assert [r.tokens for r in spec] == reference
        tree = generate(
            gpu,
            prompts,
            max_new_tokens=24,
            eos_id=None,
            batch_size=4,
            head=head,
            tree=TreeSpec(6, 2),
        )
        assert [r.tokens for r in tree] == reference
