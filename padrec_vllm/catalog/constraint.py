"""The catalog constraint: which tokens may come next in a recommendation list.

A completion is ``item <sep> item <sep> ... item <sep> <eos>`` (``Catalog.completion_ids``). Per
request, given the catalog's prefix trie, the items already in the list and the excluded items
(the history, when asked):

- an item is legal until it is emitted or excluded; a SID prefix is legal while a legal item lies
  below it, so dead subtrees are never entered;
- ``<sep>`` is legal only right after an item's last SID token, and is then the only legal token;
- ``<eos>`` is legal only after the ``<sep>`` of the k-th item, or after a ``<sep>`` once no legal
  item is left (catalog exhausted; also at the start when every item is excluded), and is then the
  only legal token;
- a token is *forced* when it is the only legal one; after ``<eos>`` nothing is legal.

``CatalogTrie`` holds the catalog-level arrays, built once in O(items x levels). Nodes are
numbered level by level (root = 0, the empty prefix), ordered by (parent, token) inside a level,
so the children of node ``n`` are the node ids ``child_ptr[n]:child_ptr[n + 1]``, their tokens
``token_of[...]`` of that range (sorted), and the leaves are the complete items.

``ListConstraint`` is the per-request state. Per-request counts are sparse: ``_removed[node]`` =
items below ``node`` that are emitted or excluded (absent = 0), so ``live(node) = items_below[node]
- _removed[node]``, and ``_dead[parent]`` = its children whose live count is 0. Removing an item
touches its L + 1 path nodes; memory per request is O(levels x (excluded + emitted items)), never
the size of the trie, so a request starts without copying anything catalog-sized. Per token:
``allowed()`` costs O(children of the current node), ``accept()`` O(log children) plus O(levels)
when it completes an item. ``checkpoint()`` / ``rollback(cp)`` undo accepted tokens for
speculative decoding, each in O(levels).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NoReturn

import numpy as np
import torch

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.tokens import EOS_ID, SEP_ID

ITEM, SEP, EOS, DONE = "item", "sep", "eos", "done"  # phases: what the next token may be


@dataclass(frozen=True, eq=False)
class CatalogTrie:
    """Prefix trie of a catalog's SID token sequences, as int64 arrays.

    ``num_nodes`` = 1 + the distinct proper non-empty prefixes + the items;
    ``child_ptr`` [num_nodes + 1]: children of ``n`` are node ids ``child_ptr[n]:child_ptr[n+1]``;
    ``token_of`` [num_nodes]: token on the edge into a node (-1 for the root);
    ``items_below`` [num_nodes]: items in a node's subtree (1 at a leaf);
    ``item_path`` [num_items, L + 1]: node ids root..leaf of item index ``i``;
    ``item_of_node`` [num_nodes]: item index of a leaf, -1 elsewhere;
    ``item_ids`` [num_items]: item index -> catalog item id (sorted ids);
    ``index_of``: item id -> item index (used when a request starts, never per token).
    """

    child_ptr: np.ndarray
    token_of: np.ndarray
    items_below: np.ndarray
    item_path: np.ndarray
    item_of_node: np.ndarray
    item_ids: np.ndarray
    index_of: dict[int, int]

    def __post_init__(self) -> None:
        for value in vars(self).values():
            if isinstance(value, np.ndarray):
                value.flags.writeable = False  # ``allowed()`` hands out views of ``token_of``

    @property
    def num_nodes(self) -> int:
        return len(self.token_of)

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> CatalogTrie:
        ids = sorted(catalog.item_to_sid)
        depth = catalog.layout.num_levels
        toks = np.array([catalog.item_token_ids(i) for i in ids], np.int64).reshape(-1, depth)
        order = np.lexsort(toks.T[::-1])  # items in lexicographic order of their tokens
        st = toks[order]  # [N, L]
        n = len(ids)
        path = np.zeros((n, depth + 1), np.int64)  # in lexicographic order; column 0 = root
        token_of, below, parent = [np.array([-1])], [np.array([n])], [np.zeros(0, np.int64)]
        new = np.zeros(n, bool)  # row starts a new prefix of the current length
        next_id = 1
        for d in range(depth):
            new |= np.r_[True, st[1:, d] != st[:-1, d]][:n]
            path[:, d + 1] = next_id + np.cumsum(new) - 1
            starts = np.flatnonzero(new)  # first row of each prefix of length d + 1
            token_of.append(st[starts, d])
            below.append(np.diff(np.r_[starts, n]))
            parent.append(path[starts, d])
            next_id += len(starts)
        # nodes of one level are sorted by parent, so every node's children are contiguous
        child_count = np.bincount(np.concatenate(parent), minlength=next_id)
        item_of_node = np.full(next_id, -1, np.int64)
        item_of_node[path[:, -1]] = order
        item_path = np.empty_like(path)
        item_path[order] = path
        return cls(
            child_ptr=np.r_[1, 1 + np.cumsum(child_count)].astype(np.int64),
            token_of=np.concatenate(token_of).astype(np.int64),
            items_below=np.concatenate(below).astype(np.int64),
            item_path=item_path,
            item_of_node=item_of_node,
            item_ids=np.array(ids, np.int64),
            index_of={item: i for i, item in enumerate(ids)},
        )


@dataclass(frozen=True)
class ListSpec:
    """What one request's list must respect, as engines receive it: ``k`` items, none of
    ``exclude`` (item ids; unknown ids are ignored). ``start(trie)`` gives the fresh state.
    ``to_json`` / ``from_json`` carry it across process boundaries (vLLM's structured-output
    parameters); ``from_json`` raises ValueError naming what is wrong."""

    k: int
    exclude: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"a list needs k >= 1 items, got k={self.k}")

    def start(self, trie: CatalogTrie) -> ListConstraint:
        return ListConstraint(trie, self.k, self.exclude)

    def to_json(self) -> dict:
        return {"k": self.k, "exclude": list(self.exclude)}

    @classmethod
    def from_json(cls, data: object) -> ListSpec:
        if not isinstance(data, dict) or not isinstance(data.get("k"), int):
            raise ValueError(f"a list spec is {{'k': int, 'exclude': [int]}}, got {data!r:.80}")
        exclude = data.get("exclude", [])
        if not isinstance(exclude, list) or not all(isinstance(i, int) for i in exclude):
            raise ValueError("a list spec's 'exclude' must be a list of item ids")
        return cls(int(data["k"]), tuple(exclude))


class ListConstraint:
    """One request's constraint state: a list of up to ``k`` items, none of them in ``exclude``.

    ``phase`` is ``item`` (inside or before an item, at trie node ``node``), ``sep`` (an item is
    complete), ``eos`` (the list is full or the catalog exhausted) or ``done`` (after ``<eos>``).
    ``items`` are the item ids emitted so far. Unknown ids in ``exclude`` are ignored (the server
    validates ids); ``k < 1`` raises ValueError.
    """

    def __init__(self, trie: CatalogTrie, k: int, exclude: Iterable[int] = ()) -> None:
        if k < 1:
            raise ValueError(f"a list needs k >= 1 items, got k={k}")
        self.trie, self.k = trie, k
        self.items: list[int] = []
        self._removed: dict[int, int] = {}  # node -> emitted or excluded items below it
        self._dead: dict[int, set[int]] = {}  # node -> its children with no legal item left
        self._log: list[tuple[str, int, int]] = []  # per accepted token: phase, node, item index
        for idx in {trie.index_of[i] for i in exclude if i in trie.index_of}:
            self._remove(idx)
        self.phase, self.node = (ITEM if self.live(0) else EOS), 0

    def live(self, node: int) -> int:
        """Legal items below ``node`` for this request (0: the prefix is dead)."""
        return int(self.trie.items_below[node]) - self._removed.get(node, 0)

    def is_done(self) -> bool:
        return self.phase == DONE

    def allowed(self) -> np.ndarray:
        """The legal next token ids, sorted (int64 [n], read-only; empty once done)."""
        if self.phase != ITEM:
            return np.array({SEP: [SEP_ID], EOS: [EOS_ID], DONE: []}[self.phase], np.int64)
        lo, hi = self.trie.child_ptr[self.node], self.trie.child_ptr[self.node + 1]
        toks = self.trie.token_of[lo:hi]
        dead = self._dead.get(self.node)
        if not dead:
            return toks
        keep = np.ones(hi - lo, bool)
        keep[np.fromiter(dead, np.int64, len(dead)) - lo] = False
        return toks[keep]

    def forced(self) -> int | None:
        """The next token when it is the only legal one, else None (also None once done)."""
        if self.phase in (SEP, EOS):
            return SEP_ID if self.phase == SEP else EOS_ID
        if self.phase == DONE:
            return None
        lo, hi = self.trie.child_ptr[self.node], self.trie.child_ptr[self.node + 1]
        dead = self._dead.get(self.node, ())
        if hi - lo - len(dead) != 1:
            return None
        return int(self.trie.token_of[lo] if not dead else self.allowed()[0])

    def accept(self, token: int) -> None:
        """Advance by one token; ValueError naming the token when it is not legal here."""
        token, entry = int(token), (self.phase, self.node, -1)
        if self.phase == ITEM:
            lo, hi = self.trie.child_ptr[self.node], self.trie.child_ptr[self.node + 1]
            child = lo + int(np.searchsorted(self.trie.token_of[lo:hi], token))
            if child >= hi or self.trie.token_of[child] != token or self.live(child) == 0:
                self._illegal(token)
            idx = int(self.trie.item_of_node[child])
            if idx >= 0:  # the item's last SID token
                self._remove(idx)
                self.items.append(int(self.trie.item_ids[idx]))
                entry = (ITEM, self.node, idx)
            self.phase, self.node = (SEP if idx >= 0 else ITEM), child
        elif self.phase == SEP and token == SEP_ID:
            full = len(self.items) >= self.k or self.live(0) == 0
            self.phase, self.node = (EOS if full else ITEM), 0
        elif self.phase == EOS and token == EOS_ID:
            self.phase = DONE
        else:
            self._illegal(token)
        self._log.append(entry)

    def checkpoint(self) -> int:
        """A mark for ``rollback``: the number of tokens accepted so far."""
        return len(self._log)

    def rollback(self, cp: int) -> None:
        """Undo every token accepted after ``checkpoint()`` returned ``cp``: afterwards the state
        (phase, node, items, live counts, allowed tokens) equals the state at that checkpoint.
        A mark stays valid until the state is rolled back to an earlier one. Undoing the last
        ``n`` tokens (vLLM's ``rollback(num_tokens)``) is ``rollback(checkpoint() - n)``."""
        if not 0 <= cp <= len(self._log):
            raise ValueError(f"checkpoint {cp} outside 0..{len(self._log)}")
        while len(self._log) > cp:
            self.phase, self.node, idx = self._log.pop()
            if idx >= 0:
                self._remove(idx, -1)
                self.items.pop()

    def forced_run(self, limit: int | None = None) -> list[int]:
        """The forced tokens that follow the current state, up to the next real choice (or
        ``<eos>``, or ``limit`` tokens). The state is left unchanged; ``accept`` them to move."""
        cp, run = self.checkpoint(), []
        while (limit is None or len(run) < limit) and (tok := self.forced()) is not None:
            self.accept(tok)
            run.append(tok)
        self.rollback(cp)
        return run

    def accept_forced(self) -> list[int]:
        """Accept the forced tokens that follow (``forced_run()``, then ``accept`` each) and
        return them."""
        run = []
        while (tok := self.forced()) is not None:
            self.accept(tok)
            run.append(tok)
        return run

    def _remove(self, idx: int, sign: int = 1) -> None:
        """Count item ``idx`` out of (``sign`` 1) or back into (-1) every node on its path."""
        path = self.trie.item_path[idx].tolist()
        for parent, node in zip([-1] + path, path):
            was_live = self.live(node) > 0
            self._removed[node] = self._removed.get(node, 0) + sign
            if not self._removed[node]:
                del self._removed[node]  # keep the dicts minimal: rollback restores them exactly
            if parent < 0 or was_live == (self.live(node) > 0):
                continue
            if was_live:
                self._dead.setdefault(parent, set()).add(node)
            else:
                self._dead[parent].discard(node)
                if not self._dead[parent]:
                    del self._dead[parent]

    def _illegal(self, token: int) -> NoReturn:
        raise ValueError(
            f"token {token} is not legal here (phase {self.phase}, legal: "
            f"{self.allowed()[:8].tolist()}{'...' if len(self.allowed()) > 8 else ''})"
        )


def _scatter(out: torch.Tensor, legal: Sequence[np.ndarray | None]) -> torch.Tensor:
    """Set row n of ``out`` (bool [N, V], zeroed here) True at ``legal[n]``, every token when
    ``legal[n]`` is None; one index assignment for the whole batch."""
    arrays = [np.zeros(0, np.int64) if a is None else a for a in legal]
    rows = np.repeat(np.arange(len(arrays)), [len(a) for a in arrays])  # [n]
    cols = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)  # [n]
    out.zero_()  # [N, V]
    out[torch.from_numpy(rows).to(out.device), torch.from_numpy(cols).to(out.device)] = True
    free = [n for n, a in enumerate(legal) if a is None]
    if free:
        out[torch.tensor(free, device=out.device)] = True
    return out


def fill_mask(states: Sequence[ListConstraint], out: torch.Tensor) -> torch.Tensor:
    """Write the legal tokens of ``states[b]`` into row ``b`` of ``out`` (bool [B, V], V at least
    the layout's vocabulary) and return it. One index assignment for the whole batch; a done
    state's row is all False (engines drop finished requests)."""
    return _scatter(out, [s.allowed() for s in states])


def legal_mask(
    legal: Sequence[np.ndarray | None], vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool [N, vocab_size]: row n True at the token ids ``legal[n]`` (sorted or not), every
    token where ``legal[n]`` is None (a row without a constraint)."""
    return _scatter(torch.empty(len(legal), vocab_size, dtype=torch.bool, device=device), legal)


def allowed_mask(
    states: Sequence[ListConstraint], vocab_size: int, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """Bool [B, vocab_size]: True where a token is legal for ``states[b]``."""
    return fill_mask(states, torch.zeros(len(states), vocab_size, dtype=torch.bool, device=device))


def apply_mask(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``logits`` [..., V] with illegal tokens (``mask`` False, same shape) set to -inf."""
    return logits.masked_fill(~mask, float("-inf"))
