"""The one accounting of decoding figures (``padrec_vllm.decoding.accounting``), by hand."""

from __future__ import annotations

import pytest

from padrec_vllm.decoding import RequestAccounting, aggregate, result_from_rounds

SLOTS = list(range(10))  # token id t has slot t: slots name output positions in these tests


def test_rounds_align_with_outputs():
    tokens = list(range(9))  # prefill token, then rounds emitting 3, 1 and 4 tokens
    r = result_from_rounds(tokens, [2, 0, 3], [3, 3, 3], 3, SLOTS)
    assert (r.target_forwards, r.plain_forwards, r.draft_forwards) == (3, 0, 9)
    assert r.tau == pytest.approx(8 / 3)
    assert r.accept_by_pos == [(2, 3), (2, 3), (1, 3)]
    # round 1 judged positions 1, 2 (accepted), 3 (rejected); round 2: 4 (rejected); round 3: 5-7
    assert r.accept_by_slot == {1: (1, 1), 2: (1, 1), 3: (0, 1), 4: (0, 1), 5: (1, 1),
                                6: (1, 1), 7: (1, 1)}
    assert r.acceptance_histogram == (1, 0, 1, 1)


def test_forwards_without_drafts_are_counted():
    r = result_from_rounds(list(range(5)), [1], [2], 3, SLOTS)  # 2 tokens recorded, 4 decoded
    assert (r.target_forwards, r.plain_forwards) == (3, 2) and r.tau == pytest.approx(4 / 3)
    assert r.accept_by_pos == [(1, 1), (0, 1), (0, 0)]
    assert r.accept_by_slot == {}  # the rounds cannot be placed: left out of the slot figures


def test_slot_counts_stop_at_the_output_end():
    r = result_from_rounds([0, 1, 2], [3], [3], 3, SLOTS)  # eos among the accepted drafts
    assert r.target_forwards == 1 and r.tau == 2.0
    assert r.accept_by_slot == {1: (1, 1), 2: (1, 1)}


def test_plain_decoding():
    r = result_from_rounds(list(range(6)), [], [], 0, SLOTS)
    assert (r.target_forwards, r.plain_forwards, r.tau, r.accept_by_pos, r.accept_by_slot) == (
        5, 5, 1.0, [], {})
    assert not r.speculative and r.acceptance_histogram == ()


def test_properties_of_a_speculative_request():
    slots = [9] * 5 + [0] * 4 + [1] * 4  # ids 5..8 slot 0, 9..12 slot 1
    # prefill emits 5; round 1 accepts 2 of 3 (6, 9) then the target's 10; round 2 accepts 0 (-> 7)
    r = result_from_rounds([5, 6, 9, 10, 7], [2, 0], [3, 3], 3, slots,
                           queue_s=0.05, prefill_s=0.1, decode_s=0.2)
    assert r.accept_by_pos == [(1, 2), (1, 2), (0, 2)]
    assert r.acceptance_histogram == (1, 0, 1, 0)
    assert r.accept_by_slot == {0: (1, 2), 1: (1, 2)}  # judged: 6 ok, 9 ok, 10 no | 7 no
    assert (r.draft_tokens, r.accepted_tokens, r.target_forwards, r.tau) == (6, 2, 2, 2.0)
    assert r.speculative and (r.queue_s, r.prefill_s, r.decode_s) == (0.05, 0.1, 0.2)
    assert r.total_s == pytest.approx(0.3) and r.verify_s == 0.2  # no drafter timing: draft_s 0


def test_accumulator_rounds_and_emission():
    acct = RequestAccounting(3, SLOTS)
    assert not acct.emit([4], max_new_tokens=6, eos_id=2)  # prefill
    acct.round(proposed=3, accepted=1, target_tokens=[5, 6], head_steps=3)
    assert not acct.emit([5, 6], 6, 2)
    acct.round(proposed=0, accepted=0, target_tokens=[7], head_steps=1)  # a gated empty round
    assert not acct.emit([7], 6, 2)
    acct.round(proposed=2, accepted=2, target_tokens=[8, 2, 9], head_steps=2)
    assert acct.emit([8, 2, 9], 6, 2)  # eos: the rest of the round is dropped
    r = acct.result(queue_s=0.5)
    assert r.tokens == [4, 5, 6, 7, 8, 2] and r.queue_s == 0.5
    assert (r.target_forwards, r.plain_forwards, r.draft_forwards) == (3, 1, 6)
    assert r.accept_by_pos == [(2, 2), (1, 2), (0, 1)]
    assert r.accept_by_slot == {5: (1, 1), 6: (0, 1), 8: (1, 1), 2: (1, 1)}
    assert list(r.accept_by_slot) == sorted(r.accept_by_slot)


def test_forced_tokens_count_only_what_is_emitted():
    acct = RequestAccounting(0)
    assert not acct.emit([4, 5, 6], 8, 2, forced=[False, True, True])  # prefill, a forced run
    acct.plain_forward()
    assert acct.emit([7, 8, 9, 2], 6, 2, forced=[False, True, True, True])  # budget cuts at 9
    r = acct.result()
    assert r.tokens == [4, 5, 6, 7, 8, 9] and r.forced_tokens == 4  # 5, 6, 8, 9
    assert r.tau == 5.0 and r.target_forwards == r.decode_tokens - r.forced_tokens
    assert aggregate([r, r]).forced_tokens == 8
    assert result_from_rounds([0, 1, 2], [1], [2], 2, None).forced_tokens == 0


def test_aggregate_is_a_ratio_of_sums():
    a = result_from_rounds([0, 1, 2, 3, 4], [3], [3], 3, SLOTS)  # 4 tokens in 1 forward
    b = result_from_rounds([0, 1, 2], [], [], 3, SLOTS)  # 2 plain forwards
    agg = aggregate([a, b])
    assert agg.tau == pytest.approx(6 / 3) and (agg.target_forwards, agg.plain_forwards) == (3, 2)
    assert agg.accept_by_pos == [(1, 1), (1, 1), (1, 1)]
    assert agg.accept_rate_by_pos == [1.0, 1.0, 1.0] and agg.num_tokens == 8
