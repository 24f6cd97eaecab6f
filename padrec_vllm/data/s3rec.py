"""Loader for S3-Rec-format sequential datasets and the leave-one-out split.

Files of a dataset ``DS`` in ``<data_dir>/DS/``:
- ``DS.txt`` (required): one user per line, ``user_id item_id item_id ...``, chronological;
- ``DS_item2attributes.json`` (required): ``{"item_id": [attr_id, ...]}``;
- ``DS_attribute_names.json`` and ``DS_item_meta.jsonl`` (optional side information).

Every problem with a file raises :class:`UserError` naming the file (and line when known).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from padrec_vllm.errors import UserError

DATASETS = ("Beauty", "Sports_and_Outdoors", "Toys_and_Games", "Yelp")
DATA_DIR_ENV = "PADREC_DATA_DIR"


def resolve_data_dir(arg: str | os.PathLike | None = None) -> Path:
    """``--data-dir``, else ``$PADREC_DATA_DIR``, else ``../shared/data`` when it exists."""
    if arg:
        path = Path(arg)
    elif os.environ.get(DATA_DIR_ENV):
        path = Path(os.environ[DATA_DIR_ENV])
    else:
        candidates = [
            Path.cwd() / "../shared/data",
            Path(__file__).resolve().parents[2] / "../shared/data",
        ]
        path = next((c for c in candidates if c.is_dir()), candidates[0])
    if not path.is_dir():
        raise UserError(f"data directory not found: {path} (set --data-dir or {DATA_DIR_ENV})")
    return path.resolve()


@dataclass(frozen=True)
class ItemInfo:
    """Side information of one item; every field may be missing."""

    title: str | None = None
    brand: str | None = None
    categories: tuple[str, ...] = ()
    attributes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Dataset:
    """Interaction sequences plus side information. Item ids are 1-based and contiguous."""

    name: str
    sequences: dict[int, list[int]]  # user id -> chronological item ids
    num_items: int
    item_attributes: dict[int, tuple[int, ...]]
    items: dict[int, ItemInfo] = field(default_factory=dict)

    @property
    def has_text(self) -> bool:
        return sum(1 for i in self.items.values() if i.title) >= 0.5 * self.num_items


@dataclass(frozen=True)
class Split:
    """Leave-one-out: last item = test, second-to-last = validation, the rest = training."""

    train: dict[int, list[int]]  # user -> training prefix (items[:-2])
    valid: dict[int, tuple[list[int], int]]  # user -> (history items[:-2], target items[-2])
    test: dict[int, tuple[list[int], int]]  # user -> (history items[:-1], target items[-1])


def leave_one_out(sequences: dict[int, list[int]]) -> Split:
    """Split every user with at least 3 items; shorter users only contribute training data."""
    train, valid, test = {}, {}, {}
    for user, items in sequences.items():
        if len(items) < 3:
            train[user] = list(items)
            continue
        train[user] = items[:-2]
        valid[user] = (items[:-2], items[-2])
        test[user] = (items[:-1], items[-1])
    return Split(train=train, valid=valid, test=test)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"missing data file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read data file {path}: {exc}") from None


def _read_json(path: Path) -> object:
    try:
        return json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise UserError(f"corrupt JSON in {path}: {exc.msg} at line {exc.lineno}") from None


def _parse_sequences(path: Path) -> dict[int, list[int]]:
    sequences: dict[int, list[int]] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            ids = [int(t) for t in line.split()]
        except ValueError:
            raise UserError(f"corrupt line {lineno} in {path}: expected integer ids") from None
        if len(ids) < 2 or min(ids) < 1:
            raise UserError(
                f"corrupt line {lineno} in {path}: need a user id and >= 1 positive item id"
            )
        if ids[0] in sequences:
            raise UserError(f"corrupt line {lineno} in {path}: user {ids[0]} appears twice")
        sequences[ids[0]] = ids[1:]
    if not sequences:
        raise UserError(f"no users in {path}")
    return sequences


def _parse_item_meta(path: Path) -> dict[int, ItemInfo]:
    items: dict[int, ItemInfo] = {}
    for lineno, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            item_id = int(row["item_id"])
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            raise UserError(
                f"corrupt line {lineno} in {path}: expected a JSON object with item_id"
            ) from None
        cats = row.get("categories") or []
        flat: list[str] = []
        for c in cats:
            flat.extend(c if isinstance(c, list) else [c])
        items[item_id] = ItemInfo(
            title=row.get("title") or None,
            brand=row.get("brand") or None,
            categories=tuple(dict.fromkeys(str(c) for c in flat if c)),
            attributes=tuple(str(a) for a in (row.get("attributes") or []) if a),
        )
    return items


def load_dataset(name: str, data_dir: str | os.PathLike | None = None) -> Dataset:
    """Load ``<data_dir>/<name>/``. Raises :class:`UserError` naming any missing or corrupt file."""
    root = resolve_data_dir(data_dir) / name
    if not root.is_dir():
        known = ", ".join(DATASETS)
        raise UserError(f"dataset folder not found: {root} (known datasets: {known})")
    sequences = _parse_sequences(root / f"{name}.txt")
    attr_path = root / f"{name}_item2attributes.json"
    raw_attrs = _read_json(attr_path)
    if not isinstance(raw_attrs, dict):
        raise UserError(f"corrupt {attr_path}: expected an object item_id -> [attribute ids]")
    try:
        item_attributes = {int(k): tuple(int(a) for a in v) for k, v in raw_attrs.items()}
    except (TypeError, ValueError):
        raise UserError(
            f"corrupt {attr_path}: item ids and attribute ids must be integers"
        ) from None
    num_items = max(max(s) for s in sequences.values())
    names_path = root / f"{name}_attribute_names.json"
    attr_names: dict[int, str | None] = {}
    if names_path.exists():
        raw_names = _read_json(names_path)
        if not isinstance(raw_names, dict):
            raise UserError(f"corrupt {names_path}: expected an object attr_id -> name")
        attr_names = {int(k): v for k, v in raw_names.items()}
    meta_path = root / f"{name}_item_meta.jsonl"
    items = _parse_item_meta(meta_path) if meta_path.exists() else {}
    if not items and attr_names:
        items = {
            i: ItemInfo(attributes=tuple(attr_names[a] for a in attrs if attr_names.get(a)))
            for i, attrs in item_attributes.items()
        }
    return Dataset(
        name=name,
        sequences=sequences,
        num_items=num_items,
        item_attributes=item_attributes,
        items=items,
    )
