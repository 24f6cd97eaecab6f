"""Token layout: the fixed mapping between semantic-ID codes, special tokens and token ids.

Contract (docs/DESIGN.md, "Token format"). Two formats, ``TOKEN_FORMATS``:
- both: ids 0..4 are the specials ``<pad> <bos> <eos> <rec> <sep>``; an item is ``num_levels``
  SID tokens (the last level is the collision level that makes every item's code unique);
- ``per-level`` (the default): every SID level ``l`` owns a contiguous id range of
  ``codebook_sizes[l]`` tokens, written ``<a_0>.. <b_0>.. <c_0>.. <d_0>..`` (level letters in
  order). The *slot* of a token is a pure function of its id: ``l`` for a token of SID level
  ``l``, ``num_levels`` for ``<sep>``, ``num_levels + 1`` for the other specials (``SlotRule``
  kind ``token``);
- ``shared``: one code range ``<code_0>..<code_{C-1}>``, C = the largest codebook, used by every
  level (code c of any level is id 5 + c). A code token's slot is not a function of its id: it is
  a function of its position q in the sequence, ``(q - 1) mod (num_levels + 1)``, because the
  prompt is built so that every item starts at such a position (``Catalog.prompt_ids``);
  ``<sep>`` and the other specials keep their slot by id (``SlotRule`` kind ``position``).
"""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

import torch

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<bos>", "<eos>", "<rec>", "<sep>")
PAD_ID, BOS_ID, EOS_ID, REC_ID, SEP_ID = range(len(SPECIAL_TOKENS))
LEVEL_LETTERS = string.ascii_lowercase
PER_LEVEL, SHARED = "per-level", "shared"
TOKEN_FORMATS: tuple[str, ...] = (PER_LEVEL, SHARED)
FROM_POSITION = -1  # a ``SlotRule.table`` entry: the token's slot comes from its position


@dataclass(frozen=True)
class SlotRule:
    """Where a token's slot comes from (module docstring).

    ``table[id]`` >= 0 is the slot of token ``id`` wherever it sits; ``FROM_POSITION`` (-1) says
    the slot of that token at sequence position q is ``(q - offset) mod period``. ``period`` 0 is
    the ``token`` rule (no entry is -1); ``period`` > 0 the ``position`` rule.
    """

    token_format: str
    table: tuple[int, ...]  # [V]
    num_slots: int
    period: int = 0
    offset: int = 1

    def __post_init__(self) -> None:
        if self.token_format not in TOKEN_FORMATS:
            raise ValueError(f"token format must be one of {TOKEN_FORMATS}, "
                             f"got {self.token_format!r}")
        low = FROM_POSITION if self.period else 0
        if not all(low <= s < self.num_slots for s in self.table):
            raise ValueError(f"slot table values must lie in {low}..{self.num_slots - 1}")
        if self.period and (self.period >= self.num_slots or self.period < 1):
            raise ValueError(f"slot period {self.period} must lie in 1..{self.num_slots - 1}")

    @property
    def kind(self) -> str:
        """``token`` (slot from the id) or ``position`` (code tokens: slot from the position)."""
        return "position" if self.period else "token"

    def slot(self, position: int, token: int) -> int:
        """The slot of ``token`` at sequence position ``position``."""
        s = self.table[token]
        return s if s != FROM_POSITION else (position - self.offset) % self.period

    def completion_slot(self, index: int, token: int) -> int:
        """The slot of ``token`` at index ``index`` of a completion. Both formats' prompts end
        right before an item's first token (``Catalog.prompt_ids``), so index j of the
        completion sits at slot j mod (num_levels + 1) under the position rule."""
        s = self.table[token]
        return s if s != FROM_POSITION else index % self.period

    def sequence_slots(self, token_ids: list[int] | tuple[int, ...]) -> list[int]:
        """The slot of every token of a whole sequence (prompt + completion) by position."""
        return [self.slot(q, t) for q, t in enumerate(token_ids)]

    def vocabulary_problem(self, token_strings: list[str]) -> str | None:
        """Why a target's vocabulary (its token strings, indexed by id) does not fit this rule,
        or None when it does: the same size, the specials at their ids, and every other token
        spelt as this format spells a token of its slot (``<code_c>`` for a position-derived
        slot, the level's letter for a per-level one)."""
        if len(token_strings) != len(self.table):
            return (f"the head has {len(self.table)} tokens, the target's vocabulary "
                    f"{len(token_strings)}")
        for i, tok in enumerate(token_strings):
            if i < len(SPECIAL_TOKENS):
                want = SPECIAL_TOKENS[i]
                ok = tok == want
            elif self.table[i] == FROM_POSITION:
                want = "<code_N>"
                ok = tok.startswith("<code_")
            else:
                want = f"<{LEVEL_LETTERS[self.table[i]]}_N>" if self.table[i] < 26 else "?"
                ok = tok.startswith(want[:-2]) and not tok.startswith("<code_")
            if not ok:
                return (f"token {i} is {tok!r} in the target's vocabulary, a {self.token_format} "
                        f"head expects {want!r}")
        return None

    def config_fields(self) -> dict:
        """The checkpoint fields of the rule (``model.head_checkpoint``)."""
        out = {"padrec_token_format": self.token_format, "padrec_slot_rule": self.kind,
               "padrec_slot_of_token": list(self.table)}
        if self.period:
            out |= {"padrec_slot_period": self.period, "padrec_slot_offset": self.offset}
        return out

    @classmethod
    def from_config_fields(cls, raw: dict, num_slots: int) -> "SlotRule | None":
        """The rule a head checkpoint's ``padrec_*`` fields describe; None without a table.
        A checkpoint from before the shared format (no ``padrec_token_format``) is per-level
        with the token rule. ValueError names a field that is wrong."""
        table = raw.get("padrec_slot_of_token")
        if table is None:
            return None
        fmt = raw.get("padrec_token_format", PER_LEVEL)
        kind = raw.get("padrec_slot_rule", "token")
        if kind not in ("token", "position"):
            raise ValueError(f"padrec_slot_rule must be 'token' or 'position', got {kind!r}")
        if kind == "position":
            if "padrec_slot_period" not in raw:
                raise ValueError("padrec_slot_rule 'position' needs padrec_slot_period")
            return cls(fmt, tuple(int(s) for s in table), num_slots,
                       int(raw["padrec_slot_period"]), int(raw.get("padrec_slot_offset", 1)))
        return cls(fmt, tuple(int(s) for s in table), num_slots)


@dataclass(frozen=True)
class TokenLayout:
    """Vocabulary of SID tokens. ``codebook_sizes[l]`` = number of codes of SID level ``l``;
    ``token_format`` one of ``TOKEN_FORMATS`` (module docstring)."""

    codebook_sizes: tuple[int, ...]
    token_format: str = PER_LEVEL

    def __post_init__(self) -> None:
        if not self.codebook_sizes or any(s < 1 for s in self.codebook_sizes):
            raise ValueError(f"codebook sizes must be positive, got {self.codebook_sizes}")
        if len(self.codebook_sizes) > len(LEVEL_LETTERS):
            raise ValueError(f"at most {len(LEVEL_LETTERS)} SID levels are supported")
        if self.token_format not in TOKEN_FORMATS:
            raise ValueError(f"token format must be one of {TOKEN_FORMATS}, "
                             f"got {self.token_format!r}")

    @property
    def shared(self) -> bool:
        """One code range for every level (the ``shared`` format)."""
        return self.token_format == SHARED

    @property
    def num_codes(self) -> int:
        """Size of the shared code range: the largest codebook (``shared`` format)."""
        return max(self.codebook_sizes)

    @property
    def num_levels(self) -> int:
        """Number of SID tokens per item (residual levels + collision level)."""
        return len(self.codebook_sizes)

    @property
    def sep_slot(self) -> int:
        return self.num_levels

    @property
    def special_slot(self) -> int:
        return self.num_levels + 1

    @property
    def num_slots(self) -> int:
        """Slots 0..num_levels-1 are SID levels, then ``<sep>``, then the other specials."""
        return self.num_levels + 2

    @property
    def tokens_per_item(self) -> int:
        """SID tokens plus the trailing ``<sep>``."""
        return self.num_levels + 1

    def level_offset(self, level: int) -> int:
        """Id of code 0 of SID level ``level``."""
        if self.shared:
            return len(SPECIAL_TOKENS)
        return len(SPECIAL_TOKENS) + sum(self.codebook_sizes[:level])

    @property
    def vocab_size(self) -> int:
        codes = self.num_codes if self.shared else sum(self.codebook_sizes)
        return len(SPECIAL_TOKENS) + codes

    def token_id(self, level: int, code: int) -> int:
        if not 0 <= code < self.codebook_sizes[level]:
            raise ValueError(f"code {code} out of range for level {level}")
        return self.level_offset(level) + code

    def sid_to_ids(self, sid: tuple[int, ...] | list[int]) -> list[int]:
        """SID codes of one item -> its token ids (without the separator)."""
        if len(sid) != self.num_levels:
            raise ValueError(f"SID {list(sid)} has {len(sid)} codes, expected {self.num_levels}")
        return [self.token_id(level, code) for level, code in enumerate(sid)]

    def decode_id(self, token_id: int) -> tuple[int, int]:
        """Token id -> (slot, code); code is -1 for specials. In the shared format a code
        token's slot is ``FROM_POSITION`` (its id does not name its level)."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        if token_id < len(SPECIAL_TOKENS):
            return (self.sep_slot if token_id == SEP_ID else self.special_slot), -1
        rest = token_id - len(SPECIAL_TOKENS)
        if self.shared:
            return FROM_POSITION, rest
        for level, size in enumerate(self.codebook_sizes):
            if rest < size:
                return level, rest
            rest -= size
        raise AssertionError("unreachable")

    def token_strings(self) -> list[str]:
        """All token strings, indexed by id."""
        out = list(SPECIAL_TOKENS)
        if self.shared:
            return out + [f"<code_{c}>" for c in range(self.num_codes)]
        for level, size in enumerate(self.codebook_sizes):
            out.extend(f"<{LEVEL_LETTERS[level]}_{c}>" for c in range(size))
        return out

    def token_strings_of(self, sid: tuple[int, ...] | list[int]) -> list[str]:
        """Token strings of one item's SID, e.g. ``["<a_3>", "<b_17>", "<c_0>", "<d_0>"]``
        (per-level) or ``["<code_3>", "<code_17>", "<code_0>", "<code_0>"]`` (shared)."""
        if self.shared:
            return [f"<code_{code}>" for code in sid]
        return [f"<{LEVEL_LETTERS[level]}_{code}>" for level, code in enumerate(sid)]

    def slot_table(self) -> list[int]:
        """``slot_of_token[id]`` for every id in the vocabulary; ``FROM_POSITION`` for the shared
        format's code tokens (``slot_rule``)."""
        table = [self.special_slot] * len(SPECIAL_TOKENS)
        table[SEP_ID] = self.sep_slot
        if self.shared:
            return table + [FROM_POSITION] * self.num_codes
        for level, size in enumerate(self.codebook_sizes):
            table.extend([level] * size)
        return table

    def slot_rule(self) -> SlotRule:
        """How the draft head and the accounting find a token's slot: by id (per-level) or, for
        code tokens, by position with period ``tokens_per_item`` and offset 1 (shared)."""
        period = self.tokens_per_item if self.shared else 0
        return SlotRule(self.token_format, tuple(self.slot_table()), self.num_slots, period)

    def slot_labels(self) -> dict[int, str]:
        """Label of every slot: ``L0``.. for the SID levels, ``sep``, ``special`` (the one
        spelling used by the bench JSON, the server's metrics and the docs)."""
        labels = {level: f"L{level}" for level in range(self.num_levels)}
        return labels | {self.sep_slot: "sep", self.special_slot: "special"}

    def slot_tensor(self) -> torch.Tensor:
        return torch.tensor(self.slot_table(), dtype=torch.long)  # [vocab_size]

    def to_dict(self) -> dict:
        out = {
            "token_format": self.token_format,
            "codebook_sizes": list(self.codebook_sizes),
            "special_tokens": list(SPECIAL_TOKENS),
            "vocab_size": self.vocab_size,
            "num_slots": self.num_slots,
        }
        if self.shared:
            out |= {"slot_period": self.tokens_per_item, "slot_offset": 1}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        """A layout dict without ``token_format`` (written before the shared format) is
        per-level."""
        return cls(codebook_sizes=tuple(int(s) for s in d["codebook_sizes"]),
                   token_format=d.get("token_format", PER_LEVEL))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TokenLayout":
        return cls.from_dict(json.loads(Path(path).read_text()))
