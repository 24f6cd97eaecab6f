"""Evaluation of the target's greedy lists on test users, next to the most-popular baseline.

Constrained by default: the lists are plain constrained greedy's (``decoding.constrained``), so
every item is in the catalog and none repeats; with ``exclude_history`` no item of the user's
history appears either (``EvalUsers.histories``). Unconstrained, they are plain greedy's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.constraint import CatalogTrie, ListConstraint
from padrec_vllm.catalog.tokens import EOS_ID
from padrec_vllm.data.s3rec import Split
from padrec_vllm.eval.metrics import ListMetrics, evaluate_lists, most_popular


@dataclass(frozen=True)
class EvalUsers:
    """Test users in a fixed order with their prompts, held-out items and histories (every item
    before the held-out one, not only the prompt's last ``history``)."""

    users: tuple[int, ...]
    prompts: tuple[tuple[int, ...], ...]
    targets: tuple[int, ...]
    histories: tuple[tuple[int, ...], ...] = ()


def sample_test_users(
    split: Split, catalog: Catalog, history: int, n: int | None, seed: int = 0
) -> EvalUsers:
    """``n`` test users drawn with ``seed`` (all when n is None or larger than the test set)."""
    users = sorted(split.test)
    if n is not None and n < len(users):
        users = sorted(random.Random(seed).sample(users, n))
    prompts = tuple(tuple(catalog.prompt_ids(split.test[u][0], history)) for u in users)
    return EvalUsers(tuple(users), prompts, tuple(split.test[u][1] for u in users),
                     tuple(tuple(split.test[u][0]) for u in users))


def max_new_tokens(catalog: Catalog, list_len: int) -> int:
    """Room for ``list_len`` items with separators plus ``<eos>``."""
    return list_len * catalog.layout.tokens_per_item + 1


def list_constraints(
    trie: CatalogTrie, eval_users: EvalUsers, list_len: int, exclude_history: bool
) -> list[ListConstraint]:
    """One fresh constraint per user, in order: ``list_len`` items, the user's history excluded
    when ``exclude_history``."""
    if exclude_history and len(eval_users.histories) != len(eval_users.users):
        raise ValueError("exclude_history needs the users' histories")
    return [
        ListConstraint(trie, list_len, eval_users.histories[i] if exclude_history else ())
        for i in range(len(eval_users.users))
    ]


def list_quality(
    catalog: Catalog, completions: list[list[int]], targets: tuple[int, ...]
) -> ListMetrics:
    lists = [list(catalog.parse(c).items) for c in completions]
    return evaluate_lists(list(targets), lists, k=10)


def evaluate_target(
    target,
    catalog: Catalog,
    split: Split,
    eval_users: EvalUsers,
    list_len: int,
    batch_size: int = 64,
    constrained: bool = True,
    exclude_history: bool = False,
) -> dict:
    """Greedy lists of ``list_len`` items for ``eval_users`` (module docstring); metrics for the
    model and for most-popular, with ``constrained`` and ``exclude_history`` as run."""
    from padrec_vllm.decoding import generate

    if exclude_history and not constrained:
        raise ValueError("exclude_history needs the constraint")
    constraints = None
    if constrained:
        trie = CatalogTrie.from_catalog(catalog)
        constraints = list_constraints(trie, eval_users, list_len, exclude_history)
    results = generate(
        target,
        [list(p) for p in eval_users.prompts],
        max_new_tokens=max_new_tokens(catalog, list_len),
        eos_id=EOS_ID,
        batch_size=batch_size,
        progress="evaluate",
        constraints=constraints,
    )
    model = list_quality(catalog, [r.tokens for r in results], eval_users.targets)
    pop = evaluate_lists(
        list(eval_users.targets), [most_popular(split.train, 10)] * len(eval_users.targets)
    )
    return {
        "users": len(eval_users.users),
        "constrained": constrained,
        "exclude_history": exclude_history,
        "target": model.as_dict(),
        "most_popular": pop.as_dict(),
    }
