"""Metric math against hand-computed cases."""

import math

import pytest

from padrec_vllm.eval.metrics import evaluate_lists, most_popular, ndcg_at_k, recall_at_k


def test_recall_and_ndcg_by_hand():
    assert recall_at_k(5, [5, 1, 2], 10) == 1.0
    assert ndcg_at_k(5, [5, 1, 2], 10) == 1.0
    assert ndcg_at_k(2, [5, 1, 2], 10) == pytest.approx(1 / math.log2(4))  # rank 3 -> 0.5
    assert ndcg_at_k(2, [5, None, 2], 10) == pytest.approx(0.5)  # invalid keeps its slot
    assert recall_at_k(9, list(range(1, 9)) + [None, 10, 9], 10) == 0.0  # rank 11 is outside
    assert ndcg_at_k(7, [7, 7, 1], 10) == 1.0


def test_aggregate_rates():
    m = evaluate_lists([1, 2], [[1, 3, 3, None], [4, 2]], k=10)
    assert m.recall_at_10 == 1.0
    assert m.ndcg_at_10 == pytest.approx((1.0 + 1 / math.log2(3)) / 2)
    assert m.invalid_item_rate == pytest.approx(1 / 6)
    assert m.duplicate_rate == pytest.approx(1 / 6)
    assert m.mean_list_len == 3.0


def test_most_popular_ties_by_id():
    assert most_popular({1: [3, 2, 2], 2: [3, 4, 1]}, 3) == [2, 3, 1]
