"""From a request to a prompt, and from a generated list to exactly k items (no HTTP, no engine).

How every answer gets k distinct, valid items not in the history (docs/SERVER.md explains why):
the model's greedy list is generated as it is (no constrained decoding, so speculation keeps its
acceptance and the output stays the target's own greedy list), then invalid codes, repeats and
history items are dropped, and the remaining places are filled from the most-popular list, each
filled item marked ``source: "popular"``. Fewer than k only when the catalog has fewer than k
items outside the history; ``notes`` says so.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from padrec_vllm.artifacts import ArtifactPaths
from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.engines import RequestResult
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
    """A validated request: what goes to the engine and what the answer must respect."""

    request: RecommendRequest
    history: list[int]  # known items, oldest first (all of them)
    used: list[int]  # the newest ``max_history`` of them: the prompt
    unknown_dropped: list[int]
    prompt: list[int]
    max_new_tokens: int

    @property
    def cold_start(self) -> bool:
        return not self.used


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
    def __init__(
        self,
        catalog: Catalog,
        popular: list[int],
        popularity_source: str,
        *,
        model: str,
        max_history: int,
        extra_items: int,
    ):
        self.catalog = catalog
        self.popular = popular  # every catalog item, most popular first
        self.popularity_source = popularity_source
        self.model = model
        self.max_history = max_history
        self.extra_items = extra_items
        # tokens the model takes in all: the target's, lowered to the engine's once it is up
        self.max_model_len: int | None = None

    @classmethod
    def load(
        cls,
        artifacts: Path,
        *,
        max_history: int | None,
        extra_items: int,
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
        )
        rec.max_model_len = int(target_config.get("max_position_embeddings", 1 << 30))
        return rec

    def warmup_prompts(self, n: int, seed: int = 0) -> list[list[int]]:
        """``n`` prompts of ``max_history`` catalog items drawn at random (fixed seed)."""
        import random

        rng = random.Random(seed)
        items = sorted(self.catalog.item_to_sid)
        size = min(self.max_history, len(items))
        return [
            self.catalog.prompt_ids(rng.sample(items, size), self.max_history) for _ in range(n)
        ]

    def budget(self, k: int, prompt_len: int) -> int:
        """Tokens to generate: k + extra_items items and <eos>, within the model's length."""
        want = (k + self.extra_items) * self.catalog.layout.tokens_per_item + 1
        if self.max_model_len is not None:
            want = min(want, self.max_model_len - prompt_len)
        return max(want, 1)

    def plan(self, req: RecommendRequest, field: str = "history") -> Plan:
        unknown = [i for i in req.history if i not in self.catalog.item_to_sid]
        if unknown and req.unknown_items == "error":
            raise UnknownItems(field, list(dict.fromkeys(unknown)))
        known = [i for i in req.history if i in self.catalog.item_to_sid]
        used = known[-self.max_history :]
        prompt = self.catalog.prompt_ids(used, self.max_history)
        return Plan(
            req, known, used, list(dict.fromkeys(unknown)), prompt, self.budget(req.k, len(prompt))
        )

    def answer(self, plan: Plan, gen: RequestResult | None) -> Answer:
        """Exactly k items (fewer only when the catalog runs out), model items first."""
        req = plan.request
        excluded = set(plan.history) if req.exclude_history else set()
        parsed = self.catalog.parse(gen.tokens) if gen is not None else None
        generated = list(parsed.items) if parsed else []
        chosen: list[tuple[int, str]] = []
        seen: set[int] = set()
        invalid = duplicate = in_history = 0
        for item in generated:
            if item is None:
                invalid += 1
            elif item in seen:
                duplicate += 1
            elif item in excluded:
                in_history += 1
                seen.add(item)
            else:
                seen.add(item)
                if len(chosen) < req.k:
                    chosen.append((item, "model"))
        from_model = len(chosen)
        if len(chosen) < req.k:
            taken = {i for i, _ in chosen}
            for item in self.popular:
                if len(chosen) == req.k:
                    break
                if item not in taken and item not in excluded:
                    chosen.append((item, "popular"))
        notes = self._notes(plan, parsed, from_model, len(chosen), invalid, duplicate, in_history)
        items = [
            Item(
                rank=r,
                item_id=i,
                sid=list(self.catalog.item_to_sid[i]),
                title=self.catalog.titles.get(i),
                source=src,
            )
            for r, (i, src) in enumerate(chosen, 1)
        ]
        history = HistoryInfo(
            received=len(req.history),
            used=len(plan.used),
            truncated=len(plan.history) > len(plan.used),
            unknown_dropped=plan.unknown_dropped,
            cold_start=plan.cold_start,
        )
        generation = GenerationInfo(
            items=len(generated),
            invalid=invalid,
            duplicate=duplicate,
            in_history=in_history,
            filled=len(chosen) - from_model,
            finished=bool(parsed and parsed.finished),
        )
        return Answer(
            items, history, generation, notes, len(generated), invalid, duplicate, in_history
        )

    def _notes(
        self,
        plan: Plan,
        parsed,
        from_model: int,
        total: int,
        invalid: int,
        duplicate: int,
        in_history: int,
    ) -> list[str]:
        req = plan.request
        notes = []
        if plan.unknown_dropped:
            notes.append(f"dropped {len(plan.unknown_dropped)} unknown history item(s)")
        if len(plan.history) > len(plan.used):
            notes.append(
                f"history has {len(plan.history)} items; the newest {len(plan.used)} "
                f"were used (limit {self.max_history})"
            )
        if plan.cold_start:
            notes.append(
                "empty history (cold start): the most-popular items "
                f"({self.popularity_source}), no model call"
            )
        elif from_model < req.k:
            why = []
            if invalid:
                why.append(f"{invalid} invalid code(s)")
            if duplicate:
                why.append(f"{duplicate} repeat(s)")
            if in_history:
                why.append(f"{in_history} history item(s)")
            count = len(parsed.items) if parsed else 0
            why.append(f"the model's list had {count} item(s)")
            notes.append(
                f"{total - from_model} item(s) filled from the most-popular list "
                f"({self.popularity_source}): " + ", ".join(why)
            )
        if total < req.k:
            notes.append(
                f"only {total} catalog item(s) are outside the history; k={req.k} cannot be met"
            )
        return notes


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
