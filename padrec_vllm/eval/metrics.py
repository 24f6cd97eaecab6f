"""Ranking metrics for one held-out item per user, over generated item lists.

A list is a sequence of item ids in rank order; ``None`` marks an invalid item (a code that names
no item). It keeps its rank slot: an invalid item pushes the later items down, as it would on the
user's screen. Duplicates count once, at their first rank.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass


def rank_of(target: int, items: list[int | None], k: int) -> int | None:
    """1-based rank of ``target`` within the first ``k`` entries, or None."""
    for r, item in enumerate(items[:k], 1):
        if item == target:
            return r
    return None


def recall_at_k(target: int, items: list[int | None], k: int) -> float:
    return 1.0 if rank_of(target, items, k) is not None else 0.0


def ndcg_at_k(target: int, items: list[int | None], k: int) -> float:
    """With one relevant item the ideal DCG is 1, so NDCG = 1 / log2(rank + 1)."""
    r = rank_of(target, items, k)
    return 0.0 if r is None else 1.0 / math.log2(r + 1)


@dataclass(frozen=True)
class ListMetrics:
    users: int
    recall_at_10: float
    ndcg_at_10: float
    invalid_item_rate: float  # invalid items / generated items
    duplicate_rate: float  # repeated valid items / generated items
    mean_list_len: float

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


def evaluate_lists(targets: list[int], lists: list[list[int | None]], k: int = 10) -> ListMetrics:
    if len(targets) != len(lists):
        raise ValueError("one list per target")
    n = max(1, len(targets))
    generated = sum(len(lst) for lst in lists)
    invalid = sum(1 for lst in lists for i in lst if i is None)
    dups = sum(c - 1 for lst in lists for c in Counter(i for i in lst if i is not None).values())
    return ListMetrics(
        users=len(targets),
        recall_at_10=sum(recall_at_k(t, lst, k) for t, lst in zip(targets, lists)) / n,
        ndcg_at_10=sum(ndcg_at_k(t, lst, k) for t, lst in zip(targets, lists)) / n,
        invalid_item_rate=invalid / max(1, generated),
        duplicate_rate=dups / max(1, generated),
        mean_list_len=generated / n,
    )


def most_popular(train: dict[int, list[int]], k: int) -> list[int]:
    """The ``k`` items most frequent in the training sequences (ties: smaller id first)."""
    counts = Counter(i for seq in train.values() for i in seq)
    return [i for i, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:k]]
