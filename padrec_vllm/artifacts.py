"""The artifacts directory that ``padrec build`` writes and every later command reads.

Layout (all paths relative to ``--artifacts DIR``)::

    build.json           dataset, preset, seed, stage timings
    prepare.json         SID statistics (codebook usage, collisions)
    catalog.jsonl        one line per item: item_id, sid, tokens, title
    token_layout.json    codebook sizes and the token -> slot table
    tokenizer/           Hugging Face fast tokenizer over the SID vocabulary
    target/              target LlamaForCausalLM (config.json, safetensors, tokenizer files)
    popularity.json      training-split interaction count per item (cold start, list fill-up)
    eval.json            Recall@10 / NDCG@10 / invalid / duplicate rates, target and most-popular
    heads/eagle/         EAGLE-1 draft head (vLLM-loadable)
    heads/padrec/        PAD-Rec draft head (vLLM-loadable)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from padrec_vllm.errors import UserError

BUILD_FILE = "build.json"
EVAL_FILE = "eval.json"
POPULARITY_FILE = "popularity.json"


@dataclass(frozen=True)
class ArtifactPaths:
    root: Path

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    def head(self, kind: str) -> Path:
        return self.root / "heads" / kind

    @property
    def popularity(self) -> Path:
        return self.root / POPULARITY_FILE

    @property
    def build_info(self) -> Path:
        return self.root / BUILD_FILE

    @property
    def eval_file(self) -> Path:
        return self.root / EVAL_FILE

    def read_build_info(self) -> dict:
        if not self.build_info.is_file():
            raise UserError(f"not an artifacts directory: {self.root} (missing {BUILD_FILE}; run `padrec build`)")
        try:
            return json.loads(self.build_info.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"corrupt {self.build_info}: {exc.msg}") from None

    def write_build_info(self, info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.build_info.write_text(json.dumps(info, indent=2) + "\n")
