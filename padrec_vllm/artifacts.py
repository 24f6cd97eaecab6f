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
CONFIG_FILE = "config.json"  # of the target and of every head (Hugging Face layout)


@dataclass(frozen=True)
class ArtifactPaths:
    root: Path

    @property
    def target(self) -> Path:
        return self.root / "target"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def target_config_file(self) -> Path:
        return self.target / CONFIG_FILE

    def target_config(self) -> dict:
        """The target's ``config.json``; UserError when it is missing or corrupt."""
        return _read_json(
            self.target_config_file, f"no target model in {self.target} (run `padrec build`)"
        )

    def head(self, name: str) -> Path:
        """Folder of the draft head ``name`` (a head kind or an ablation variant)."""
        return self.root / "heads" / name

    def has_head(self, name: str) -> bool:
        """A trained head ``name`` is there (its ``config.json`` exists)."""
        return (self.head(name) / CONFIG_FILE).is_file()

    def head_config(self, name: str) -> dict:
        """The ``config.json`` of head ``name``; UserError when it is missing or corrupt."""
        return _read_json(
            self.head(name) / CONFIG_FILE,
            f"no {name} head in {self.head(name)} (train it with `padrec train-heads`)",
        )

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
        return _read_json(
            self.build_info,
            f"not an artifacts directory: {self.root} (missing {BUILD_FILE}; run `padrec build`)",
        )

    def write_build_info(self, info: dict) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.build_info.write_text(json.dumps(info, indent=2) + "\n")


def _read_json(path: Path, missing: str) -> dict:
    """``path`` parsed; UserError ``missing`` when it is absent, a UserError naming the error
    when it is not JSON."""
    if not path.is_file():
        raise UserError(missing)
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"corrupt {path}: {exc.msg}") from None
