"""The catalog: item id <-> semantic ID, both directions, and parsing of generated lists.

On disk (``<artifacts>/``): ``catalog.jsonl`` (one line per item: ``item_id``, ``sid``,
``tokens``, ``title`` when known) and ``token_layout.json`` (token format, codebook sizes and
the token -> slot table; ``FROM_POSITION`` entries, with ``slot_period`` / ``slot_offset``, for
the shared format's code tokens). A generated code that names no item is an *invalid item*: it
is counted, never raised.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from padrec_vllm.catalog.tokens import BOS_ID, EOS_ID, REC_ID, SEP_ID, TokenLayout
from padrec_vllm.errors import UserError

CATALOG_FILE = "catalog.jsonl"
LAYOUT_FILE = "token_layout.json"


@dataclass(frozen=True)
class ParsedList:
    """A generated completion split into items. ``items[j]`` is None for an invalid code."""

    items: tuple[int | None, ...]
    finished: bool  # saw <eos>

    @property
    def num_invalid(self) -> int:
        return sum(1 for i in self.items if i is None)


@dataclass(frozen=True)
class Catalog:
    layout: TokenLayout
    item_to_sid: dict[int, tuple[int, ...]]
    titles: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        sid_to_item = {sid: item for item, sid in self.item_to_sid.items()}
        if len(sid_to_item) != len(self.item_to_sid):
            raise ValueError("semantic IDs are not unique")
        object.__setattr__(
            self,
            "_tokens_to_item",
            {tuple(self.layout.sid_to_ids(s)): i for s, i in sid_to_item.items()},
        )

    @property
    def num_items(self) -> int:
        return len(self.item_to_sid)

    def item_token_ids(self, item: int) -> list[int]:
        """SID tokens of one item (no separator). KeyError for an unknown item."""
        return self.layout.sid_to_ids(self.item_to_sid[item])

    def prompt_ids(self, history: list[int], max_history: int) -> list[int]:
        """The prompt over the last ``max_history`` items of ``history``.

        per-level: ``<bos> h1 <sep> ... hn <sep> <rec>``. shared: ``<bos> h1 <sep> ... hn
        <rec>``, i.e. ``<rec>`` takes the place of the last token (the last ``<sep>``, or
        ``<bos>`` when the history is empty, so the prompt is ``<rec>``), which makes the prompt
        1 + n (L + 1) tokens long: every item token, in the history and in the completion, sits
        at a position q with slot ``(q - 1) mod (L + 1)`` (``tokens.SlotRule``).
        """
        ids = [BOS_ID]
        for item in history[-max_history:] if max_history > 0 else []:
            ids += self.item_token_ids(item) + [SEP_ID]
        if self.layout.shared:
            return ids[:-1] + [REC_ID]
        return ids + [REC_ID]

    def completion_ids(self, items: list[int], finished: bool) -> list[int]:
        """``r1 <sep> ... rN <sep>`` then ``<eos>`` when ``finished``."""
        ids: list[int] = []
        for item in items:
            ids += self.item_token_ids(item) + [SEP_ID]
        return ids + ([EOS_ID] if finished else [])

    def parse(self, token_ids: list[int]) -> ParsedList:
        """Split generated ids at ``<sep>``; stop at ``<eos>``. A malformed chunk is invalid."""
        items: list[int | None] = []
        chunk: list[int] = []
        finished = False
        for t in token_ids:
            if t == EOS_ID:
                finished = True
                break
            if t == SEP_ID:
                items.append(self._tokens_to_item.get(tuple(chunk)))
                chunk = []
            else:
                chunk.append(int(t))
        if chunk:  # a trailing item without its separator (length limit hit)
            items.append(self._tokens_to_item.get(tuple(chunk)))
        return ParsedList(items=tuple(items), finished=finished)

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        with open(out_dir / CATALOG_FILE, "w") as f:
            for item in sorted(self.item_to_sid):
                row = {
                    "item_id": item,
                    "sid": list(self.item_to_sid[item]),
                    "tokens": self.layout.token_strings_of(self.item_to_sid[item]),
                }
                if item in self.titles:
                    row["title"] = self.titles[item]
                f.write(json.dumps(row) + "\n")
        layout = self.layout.to_dict() | {"slot_of_token": self.layout.slot_table()}
        (out_dir / LAYOUT_FILE).write_text(json.dumps(layout) + "\n")

    @classmethod
    def load(cls, art_dir: Path) -> "Catalog":
        art_dir = Path(art_dir)
        for name in (CATALOG_FILE, LAYOUT_FILE):
            if not (art_dir / name).is_file():
                raise UserError(
                    f"missing artifact file: {art_dir / name} (run `padrec prepare` first)"
                )
        try:
            layout = TokenLayout.from_dict(json.loads((art_dir / LAYOUT_FILE).read_text()))
            item_to_sid, titles = {}, {}
            for line in (art_dir / CATALOG_FILE).read_text().splitlines():
                row = json.loads(line)
                item_to_sid[int(row["item_id"])] = tuple(int(c) for c in row["sid"])
                if row.get("title"):
                    titles[int(row["item_id"])] = row["title"]
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise UserError(f"corrupt catalog in {art_dir}: {exc}") from None
        return cls(layout=layout, item_to_sid=item_to_sid, titles=titles)
