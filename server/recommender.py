"""From a request to a prompt, and from a generated list to exactly k items (no HTTP, no engine).

How every answer gets k distinct, valid items not in the history (docs/SERVER.md explains it):

- Under the catalog constraint (``PADREC_CONSTRAINED``, the default) the plan carries a
  ``ListSpec(k, exclude)`` (``exclude``: every known history item when ``exclude_history``) and
  a budget of exactly ``k`` items and ``<eos>``; the engine decodes only legal lists, so every
  item the model gives is valid, new and outside the history (``source: "model"``). The
  most-popular list fills only what the model could not give: the budget cut by the model's
  maximum length, or a catalog with fewer than k legal items, where the fill finds nothing
  either; ``notes`` says which.
- Without it the model's greedy list is generated as it is, ``k + extra_items`` items, then
  invalid codes, repeats and history items are dropped (and counted), and the remaining places
  are filled from the most-popular list (``source: "popular"``).

Either way the answer has fewer than k items only when the catalog has fewer than k items outside
the history, and ``notes`` says so. A cold start (no usable history) is the most-popular list
without a model call.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import islice
from pathlib import Path

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.catalog.catalog import Catalog, ParsedList
from padrec_vllm.catalog.constraint import ListSpec
from padrec_vllm.catalog.tokens import SEP_ID
from padrec_vllm.engines import RequestResult
from padrec_vllm.engines.calibration import calibration_prompts
from padrec_vllm.errors import UserError
from padrec_vllm.presets import PRESETS
from server.schemas import GenerationInfo, HistoryInfo, Item, RecommendRequest

log = logging.getLogger("padrec.server")

DEFAULT_HISTORY = 20


class UnknownItems(ValueError):
    """History ids that are not in the catalog (the server answers 422)."""

    def __init__(self, field: str, items: list[int]):
        self.field = field
        self.items = items
        shown = ", ".join(map(str, items[:20])) + (" ..." if len(items) > 20 else "")
        super().__init__(
            f"{field}: {len(items)} unknown item id(s): {shown} "
            f'(send unknown_items="ignore" to drop them)'
        )


@dataclass(frozen=True)
class Plan:
    """A validated request: what goes to the engine and what the answer must respect.

    ``constraint`` is the engine's list constraint (``k`` items, the history excluded when asked);
    None without the constraint and for a cold start (no model call)."""

    request: RecommendRequest
    history: list[int]  # known items, oldest first (all of them)
    used: list[int]  # the newest ``max_history`` of them: the prompt
    unknown_dropped: list[int]
    prompt: list[int]
    max_new_tokens: int
    constraint: ListSpec | None = None

    @property
    def cold_start(self) -> bool:
        return not self.used


@dataclass(frozen=True)
class Picked:
    """The model's items an answer keeps (valid, first occurrence, not excluded, at most k, in
    the model's order) and the generated items dropped, by reason."""

    items: list[int]
    invalid: int = 0
    duplicate: int = 0
    in_history: int = 0


def pick(generated: Iterable[int | None], excluded: set[int], k: int) -> Picked:
    """Keep the model's items an answer may show: the first ``k`` valid, new, non-excluded ones.
    Invalid codes (None), repeats and excluded items are counted, wherever they occur."""
    kept: list[int] = []
    seen: set[int] = set()
    invalid = duplicate = in_history = 0
    for item in generated:
        if item is None:
            invalid += 1
        elif item in seen:
            duplicate += 1
        else:
            seen.add(item)
            if item in excluded:
                in_history += 1
            elif len(kept) < k:
                kept.append(item)
    return Picked(kept, invalid, duplicate, in_history)


@dataclass(frozen=True)
class Answer:
    items: list[Item]
    history: HistoryInfo
    generation: GenerationInfo
    notes: list[str]
    generated_items: int
    invalid: int
    duplicate: int
    in_history: int


class Recommender:
    """Requests -> plans (prompt, budget, constraint); generated lists -> answers of k items.
    ``constrained``: decode under the catalog constraint (module docstring)."""

    def __init__(
        self,
        catalog: Catalog,
        popular: list[int],
        popularity_source: str,
        *,
        model: str,
        max_history: int,
        extra_items: int,
        constrained: bool = True,
    ):
        self.catalog = catalog
        self.popular = popular  # every catalog item, most popular first
        self.popularity_source = popularity_source
        self.model = model
        self.max_history = max_history
        self.extra_items = extra_items
        self.constrained = constrained
        # tokens the model takes in all: the target's, lowered to the engine's once it is up
        self.max_model_len: int | None = None

    @classmethod
    def load(
        cls,
        artifacts: Path,
        *,
        max_history: int | None,
        extra_items: int,
        constrained: bool = True,
        data_dir: Path | None = None,
    ) -> Recommender:
        """Catalog, build info and popularity of an artifacts directory; UserError when unusable."""
        paths = ArtifactPaths(Path(artifacts))
        info = paths.read_build_info()
        catalog = Catalog.load(paths.root)
        target_config = paths.target_config()
        preset = PRESETS.get(info.get("preset", ""))
        popular, source = load_popularity(paths, catalog, info.get("dataset"), data_dir)
        rec = cls(
            catalog,
            popular,
            source,
            model=f"{info.get('dataset', '?')}/{info.get('preset', '?')}",
            max_history=max_history or (preset.history if preset else DEFAULT_HISTORY),
            extra_items=extra_items,
            constrained=constrained,
        )
        rec.max_model_len = int(target_config.get("max_position_embeddings", 1 << 30))
        return rec

    def warmup_prompts(self, n: int, seed: int = 0) -> list[list[int]]:
        """``n`` prompts of ``max_history`` catalog items drawn at random (fixed seed)."""
        return calibration_prompts(self.catalog, n, self.max_history, seed)

    def list_tokens(self, k: int) -> int:
        """Tokens of a whole list: ``k`` items (without the constraint ``k + extra_items``, room
        for filtering) and ``<eos>``."""
        items = k if self.constrained else k + self.extra_items
        return items * self.catalog.layout.tokens_per_item + 1

    def budget(self, k: int, prompt_len: int) -> int:
        """Tokens to generate: ``list_tokens(k)``, within the model's length (at least 1)."""
        want = self.list_tokens(k)
        if self.max_model_len is not None:
            want = min(want, self.max_model_len - prompt_len)
        return max(want, 1)

    def list_spec(
        self, k: int, history: Sequence[int] = (), exclude: bool = False
    ) -> ListSpec | None:
        """The engine's constraint for a list of ``k`` items, excluding ``history`` when
        ``exclude``; None without the constraint."""
        if not self.constrained:
            return None
        return ListSpec(k, tuple(dict.fromkeys(history)) if exclude else ())

    def plan(self, req: RecommendRequest, field: str = "history") -> Plan:
        """The plan of ``req``; UnknownItems (naming ``field``) for unknown history ids unless
        the request ignores them."""
        unknown = [i for i in req.history if i not in self.catalog.item_to_sid]
        if unknown and req.unknown_items == "error":
            raise UnknownItems(field, list(dict.fromkeys(unknown)))
        known = [i for i in req.history if i in self.catalog.item_to_sid]
        used = known[-self.max_history :]
        prompt = self.catalog.prompt_ids(used, self.max_history)
        spec = self.list_spec(req.k, known, req.exclude_history) if used else None
        return Plan(
            req,
            known,
            used,
            list(dict.fromkeys(unknown)),
            prompt,
            self.budget(req.k, len(prompt)),
            spec,
        )

    def answer(self, plan: Plan, gen: RequestResult | None) -> Answer:
        """Exactly k items (fewer only when the catalog runs out), model items first, then the
        most-popular fill; ``gen`` None for a cold start."""
        req = plan.request
        excluded = set(plan.history) if req.exclude_history else set()
        parsed = self._parse(plan, gen)
        picked = pick(parsed.items if parsed else (), excluded, req.k)
        chosen = [(i, "model") for i in picked.items]
        chosen += [(i, "popular") for i in self._fill(picked.items, excluded, req.k)]
        generation = GenerationInfo(
            items=len(parsed.items) if parsed else 0,
            invalid=picked.invalid,
            duplicate=picked.duplicate,
            in_history=picked.in_history,
            filled=len(chosen) - len(picked.items),
            finished=bool(parsed and parsed.finished),
            forced=gen.forced_tokens if gen is not None else 0,
            constrained=plan.constraint is not None and gen is not None,
        )
        return Answer(
            [self._item(rank, i, src) for rank, (i, src) in enumerate(chosen, 1)],
            self._history_info(plan),
            generation,
            self._notes(plan, parsed, picked, len(chosen)),
            generation.items,
            picked.invalid,
            picked.duplicate,
            picked.in_history,
        )

    def _parse(self, plan: Plan, gen: RequestResult | None) -> ParsedList | None:
        """``gen``'s list, None for a cold start. Under the constraint a trailing item the budget
        cut short is left out: it is a legal SID prefix, not an invalid code."""
        if gen is None:
            return None
        parsed = self.catalog.parse(gen.tokens)
        cut = not parsed.finished and bool(gen.tokens) and gen.tokens[-1] != SEP_ID
        if plan.constraint is not None and cut and parsed.items[-1] is None:
            return ParsedList(items=parsed.items[:-1], finished=False)
        return parsed

    def _fill(self, model_items: list[int], excluded: set[int], k: int) -> list[int]:
        """The most popular items not in ``model_items`` nor ``excluded``, up to ``k`` in all."""
        need = k - len(model_items)
        if need <= 0:
            return []
        taken = set(model_items) | excluded
        return list(islice((i for i in self.popular if i not in taken), need))

    def _item(self, rank: int, item: int, source: str) -> Item:
        return Item(
            rank=rank,
            item_id=item,
            sid=list(self.catalog.item_to_sid[item]),
            title=self.catalog.titles.get(item),
            source=source,
        )

    @staticmethod
    def _history_info(plan: Plan) -> HistoryInfo:
        return HistoryInfo(
            received=len(plan.request.history),
            used=len(plan.used),
            truncated=len(plan.history) > len(plan.used),
            unknown_dropped=plan.unknown_dropped,
            cold_start=plan.cold_start,
        )

    def _notes(
        self, plan: Plan, parsed: ParsedList | None, picked: Picked, total: int
    ) -> list[str]:
        """Why the answer differs from the model's own list of k items, if it does."""
        req = plan.request
        notes = []
        if plan.unknown_dropped:
            notes.append(f"dropped {len(plan.unknown_dropped)} unknown history item(s)")
        if len(plan.history) > len(plan.used):
            notes.append(
                f"history has {len(plan.history)} items; the newest {len(plan.used)} "
                f"were used (limit {self.max_history})"
            )
        from_model = len(picked.items)
        if plan.cold_start:
            notes.append(
                "empty history (cold start): the most-popular items "
                f"({self.popularity_source}), no model call"
            )
        elif from_model < req.k:
            why = ", ".join(self._shortfall(plan, parsed, picked))
            if total > from_model:
                notes.append(
                    f"{total - from_model} item(s) filled from the most-popular list "
                    f"({self.popularity_source}): {why}"
                )
            else:
                notes.append(f"the model gave {from_model} item(s): {why}")
        if total < req.k:
            where = "are outside the history" if req.exclude_history else "exist"
            notes.append(
                f"only {total} catalog item(s) {where}; k={req.k} cannot be met "
                "(the most-popular list has no other item either)"
            )
        return notes

    def _shortfall(self, plan: Plan, parsed: ParsedList | None, picked: Picked) -> list[str]:
        """Why the model gave fewer than k usable items: what was dropped, then what ended it."""
        why = []
        if picked.invalid:
            why.append(f"{picked.invalid} invalid code(s)")
        if picked.duplicate:
            why.append(f"{picked.duplicate} repeat(s)")
        if picked.in_history:
            why.append(f"{picked.in_history} history item(s)")
        count = len(parsed.items) if parsed else 0
        if plan.constraint is not None and parsed is not None and parsed.finished:
            why.append(f"no legal catalog item was left after {count} item(s)")
        elif plan.max_new_tokens < self.list_tokens(plan.request.k):
            why.append(
                f"the model's maximum length ({self.max_model_len} tokens, the prompt "
                f"{len(plan.prompt)}) cut the list at {plan.max_new_tokens} tokens"
            )
        else:
            why.append(f"the model's list had {count} item(s)")
        return why


def load_popularity(
    paths: ArtifactPaths, catalog: Catalog, dataset: str | None, data_dir: Path | None
) -> tuple[list[int], str]:
    """Every catalog item, most popular first (ties: smaller id), and where the counts came from.

    In order: ``<artifacts>/popularity.json`` (``{"item_id": count, ...}``); the training part
    (leave-one-out) of the dataset named in build.json, found under ``data_dir`` /
    ``$PADREC_DATA_DIR`` / ``../shared/data``; else no counts (catalog order).
    """
    counts: Counter[int] = Counter()
    source = "catalog order (no popularity data found)"
    pop_file = paths.popularity
    if pop_file.is_file():
        try:
            counts = Counter({int(k): int(v) for k, v in json.loads(pop_file.read_text()).items()})
            source = f"most popular ({pop_file.name})"
        except (ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring corrupt %s: %s", pop_file, exc)
    elif dataset:
        from padrec_vllm.data.s3rec import leave_one_out, load_dataset

        try:
            split = leave_one_out(load_dataset(dataset, data_dir).sequences)
            counts = Counter(i for seq in split.train.values() for i in seq)
            source = f"most popular (training interactions of {dataset})"
        except UserError as exc:
            log.warning("popularity fallback uses catalog order: %s", exc)
    order = sorted(catalog.item_to_sid, key=lambda i: (-counts.get(i, 0), i))
    return order, source
