"""Named training presets: target size, data budget and evaluation size, one frozen record each.

``tiny`` is for tests (head size 32: the smallest vLLM's CPU attention supports), ``demo`` for the
default build on a CPU, ``bench`` for a GPU or a long background job on CPU (build times:
docs/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass

from padrec_vllm.errors import UserError


@dataclass(frozen=True)
class TargetPreset:
    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    intermediate_size: int
    history: int = 20  # H: history items in the prompt
    list_len: int = 10  # N: items per training list
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 0.01
    max_steps: int = 1000
    # datasets whose target needs more steps than max_steps: ((dataset, steps), ...)
    steps_by_dataset: tuple[tuple[str, int], ...] = ()
    warmup_steps: int = 100
    max_train_users: int | None = None  # subsample users (tiny preset)
    eval_users: int = 2000  # test users evaluated by `padrec build`
    codebook_size: int = 256
    head_steps: int = 1000  # draft-head training steps (same for every head)
    head_users: int = 4000  # training histories used for self-distillation
    head_batch_size: int = 32
    num_draft_tokens: int = 4  # K
    seed: int = 0

    def steps_for(self, dataset: str) -> int:
        """Target training steps for ``dataset``: its entry in ``steps_by_dataset``, else
        ``max_steps``."""
        return dict(self.steps_by_dataset).get(dataset, self.max_steps)


PRESETS: dict[str, TargetPreset] = {
    p.name: p
    for p in (
        TargetPreset(
            "tiny",
            num_layers=2,
            hidden_size=64,
            num_heads=2,
            intermediate_size=128,
            history=5,
            list_len=4,
            batch_size=32,
            lr=3e-3,
            max_steps=60,
            warmup_steps=10,
            max_train_users=300,
            eval_users=50,
            codebook_size=16,
            head_steps=40,
            head_users=64,
            head_batch_size=16,
            num_draft_tokens=3,
        ),
        # 4 narrow layers, sized to train within minutes on a small CPU machine (build times and
        # quality against most-popular: docs/RESULTS.md, "Target quality")
        TargetPreset(
            "demo",
            num_layers=4,
            hidden_size=128,
            num_heads=2,
            intermediate_size=384,
            lr=3e-3,
            max_steps=1500,
            # Yelp's 225k training lists: 1,500 steps (0.4 epochs) left the target below
            # most-popular (docs/RESULTS.md, "Quality under the constraint")
            steps_by_dataset=(("Yelp", 4500),),
            warmup_steps=100,
            eval_users=2000,
            head_steps=400,
            head_users=1500,
        ),
        TargetPreset(
            "bench",
            num_layers=8,
            hidden_size=384,
            num_heads=6,
            intermediate_size=1024,
            batch_size=256,
            lr=1e-3,
            max_steps=6000,
            warmup_steps=300,
            eval_users=22363,
            head_steps=1500,
            head_users=8000,
            head_batch_size=128,
        ),
    )
}


def get_preset(name: str) -> TargetPreset:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}; choose from {', '.join(PRESETS)}")
    return PRESETS[name]
