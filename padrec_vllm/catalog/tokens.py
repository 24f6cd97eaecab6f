"""Token layout: the fixed mapping between semantic-ID codes, special tokens and token ids.

Contract (docs/DESIGN.md, "Token format"):
- ids 0..4 are the specials ``<pad> <bos> <eos> <rec> <sep>``;
- every SID level ``l`` owns a contiguous id range of ``codebook_sizes[l]`` tokens, written
  ``<a_0>.. <b_0>.. <c_0>.. <d_0>..`` (level letters in order; the last level is the collision
  level that makes every item's code unique);
- the *slot* of a token is a pure function of its id: ``l`` for a token of SID level ``l``,
  ``num_levels`` for ``<sep>``, ``num_levels + 1`` for the other specials. The draft head needs this
  inside vLLM, where it sees token ids but no request history.
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


@dataclass(frozen=True)
class TokenLayout:
    """Vocabulary of SID tokens. ``codebook_sizes[l]`` = number of codes of SID level ``l``."""

    codebook_sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.codebook_sizes or any(s < 1 for s in self.codebook_sizes):
            raise ValueError(f"codebook sizes must be positive, got {self.codebook_sizes}")
        if len(self.codebook_sizes) > len(LEVEL_LETTERS):
            raise ValueError(f"at most {len(LEVEL_LETTERS)} SID levels are supported")

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
        return len(SPECIAL_TOKENS) + sum(self.codebook_sizes[:level])

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + sum(self.codebook_sizes)

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
        """Token id -> (slot, code); code is -1 for specials."""
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} outside the vocabulary of {self.vocab_size}")
        if token_id < len(SPECIAL_TOKENS):
            return (self.sep_slot if token_id == SEP_ID else self.special_slot), -1
        rest = token_id - len(SPECIAL_TOKENS)
        for level, size in enumerate(self.codebook_sizes):
            if rest < size:
                return level, rest
            rest -= size
        raise AssertionError("unreachable")

    def token_strings(self) -> list[str]:
        """All token strings, indexed by id."""
        out = list(SPECIAL_TOKENS)
        for level, size in enumerate(self.codebook_sizes):
            out.extend(f"<{LEVEL_LETTERS[level]}_{c}>" for c in range(size))
        return out

    def token_strings_of(self, sid: tuple[int, ...] | list[int]) -> list[str]:
        """Token strings of one item's SID, e.g. ``["<a_3>", "<b_17>", "<c_0>", "<d_0>"]``."""
        return [f"<{LEVEL_LETTERS[level]}_{code}>" for level, code in enumerate(sid)]

    def slot_table(self) -> list[int]:
        """``slot_of_token[id]`` for every id in the vocabulary."""
        table = [self.special_slot] * len(SPECIAL_TOKENS)
        table[SEP_ID] = self.sep_slot
        for level, size in enumerate(self.codebook_sizes):
            table.extend([level] * size)
        return table

    def slot_labels(self) -> dict[int, str]:
        """Label of every slot: ``L0``.. for the SID levels, ``sep``, ``special`` (the one
        spelling used by the bench JSON, the server's metrics and the docs)."""
        labels = {level: f"L{level}" for level in range(self.num_levels)}
        return labels | {self.sep_slot: "sep", self.special_slot: "special"}

    def slot_tensor(self) -> torch.Tensor:
        return torch.tensor(self.slot_table(), dtype=torch.long)  # [vocab_size]

    def to_dict(self) -> dict:
        return {
            "codebook_sizes": list(self.codebook_sizes),
            "special_tokens": list(SPECIAL_TOKENS),
            "vocab_size": self.vocab_size,
            "num_slots": self.num_slots,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "TokenLayout":
        return cls(codebook_sizes=tuple(int(s) for s in d["codebook_sizes"]))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> "TokenLayout":
        return cls.from_dict(json.loads(Path(path).read_text()))
