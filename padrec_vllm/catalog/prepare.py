"""``padrec prepare``: dataset -> item embeddings -> semantic IDs -> catalog + tokenizer."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from padrec_vllm.catalog.catalog import Catalog
from padrec_vllm.catalog.embed import embed_items
from padrec_vllm.catalog.rq import QuantiserConfig, add_collision_level, residual_kmeans
from padrec_vllm.catalog.tokenizer import TOKENIZER_DIR, save_tokenizer
from padrec_vllm.catalog.tokens import PER_LEVEL, TokenLayout
from padrec_vllm.data.s3rec import Dataset, leave_one_out

PREPARE_REPORT = "prepare.json"


@dataclass(frozen=True)
class PrepareReport:
    dataset: str
    num_items: int
    embedding: str
    codebook_usage: tuple[int, ...]  # distinct codes used per residual level
    collisions: int  # items whose residual codes are shared with an earlier item
    max_collision_depth: int  # size of the collision level
    vocab_size: int

    def lines(self) -> list[str]:
        usage = ", ".join(f"L{i}: {u}" for i, u in enumerate(self.codebook_usage))
        return [
            f"{self.dataset}: {self.num_items} items, embeddings: {self.embedding}",
            f"codebook usage (distinct codes per level): {usage}",
            f"collisions: {self.collisions} items share residual codes; "
            f"collision level size {self.max_collision_depth}; vocabulary {self.vocab_size} tokens",
        ]


def build_catalog(
    dataset: Dataset, qcfg: QuantiserConfig, embedding: str = "auto",
    token_format: str = PER_LEVEL,
) -> tuple[Catalog, PrepareReport]:
    """SIDs of every item and the catalog over them in ``token_format`` (``TOKEN_FORMATS``)."""
    split = leave_one_out(dataset.sequences)
    emb, method = embed_items(dataset, split.train, embedding, seed=qcfg.seed)
    codes = add_collision_level(residual_kmeans(emb, qcfg))  # [N, levels + 1]
    depth = int(codes[:, -1].max()) + 1
    layout = TokenLayout((qcfg.codebook_size,) * qcfg.levels + (depth,), token_format)
    item_to_sid = {i + 1: tuple(int(c) for c in row) for i, row in enumerate(codes.tolist())}
    titles = {i: info.title for i, info in dataset.items.items() if info.title}
    catalog = Catalog(layout=layout, item_to_sid=item_to_sid, titles=titles)
    usage = tuple(len(set(codes[:, lvl].tolist())) for lvl in range(qcfg.levels))
    prefix_counts = Counter(map(tuple, codes[:, :-1].tolist()))
    collisions = sum(c - 1 for c in prefix_counts.values())
    report = PrepareReport(
        dataset.name, len(item_to_sid), method, usage, collisions, depth, layout.vocab_size
    )
    return catalog, report


def prepare(
    dataset: Dataset, out_dir: Path, qcfg: QuantiserConfig, embedding: str = "auto",
    token_format: str = PER_LEVEL,
) -> PrepareReport:
    """Writes ``catalog.jsonl``, ``token_layout.json``, ``tokenizer/`` and ``prepare.json``."""
    catalog, report = build_catalog(dataset, qcfg, embedding, token_format)
    out_dir.mkdir(parents=True, exist_ok=True)
    catalog.save(out_dir)
    save_tokenizer(catalog.layout, out_dir / TOKENIZER_DIR)
    (out_dir / PREPARE_REPORT).write_text(
        json.dumps(report.__dict__ | {"quantiser": qcfg.__dict__, "token_format": token_format},
                   indent=2) + "\n"
    )
    return report
