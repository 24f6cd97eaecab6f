"""List-wise training examples: the last H history items -> the next N items.

For each user's training prefix ``seq`` and each cut point ``t`` (1 <= t < len(seq)):
prompt = ``Catalog.prompt_ids`` over ``seq[max(0, t-H):t]`` (``<bos> h <sep> ... <sep> <rec>``;
the shared token format ends ``... h <rec>``), completion =
``r1 <sep> ... rm <sep>`` over ``seq[t:t+N]``, followed by ``<eos>`` only when the list is full
(m == N): a shorter list was cut by the end of the data, not ended by the user, so the model is
never taught to stop early. Loss is on the completion only.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.tokens import PAD_ID

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    prompt: tuple[int, ...]
    completion: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.prompt) + len(self.completion)


def list_examples(
    train: dict[int, list[int]],
    catalog: Catalog,
    history: int,
    list_len: int,
    max_users: int | None = None,
    seed: int = 0,
) -> list[Example]:
    users = sorted(train)
    if max_users is not None and max_users < len(users):
        users = sorted(random.Random(seed).sample(users, max_users))
    out = []
    for user in users:
        seq = train[user]
        for t in range(1, len(seq)):
            target = seq[t : t + list_len]
            out.append(
                Example(
                    prompt=tuple(catalog.prompt_ids(seq[:t], history)),
                    completion=tuple(
                        catalog.completion_ids(target, finished=len(target) == list_len)
                    ),
                )
            )
    return out


def collate(batch: list[Example]) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` [B, T]; labels mask prompt and
    pad."""
    width = max(len(e) for e in batch)
    ids = torch.full((len(batch), width), PAD_ID, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for r, e in enumerate(batch):
        seq = e.prompt + e.completion
        ids[r, : len(seq)] = torch.tensor(seq)
        labels[r, len(e.prompt) : len(seq)] = torch.tensor(e.completion)
        mask[r, : len(seq)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def length_bucketed_batches(
    examples: list[Example], batch_size: int, rng: random.Random
) -> list[list[Example]]:
    """Shuffled batches of similar length (less padding): sort within chunks of 50 batches."""
    order = examples[:]
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=len)
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches
