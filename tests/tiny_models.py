"""Random tiny models for CPU tests: a Llama target over a small SID vocabulary and draft heads."""

from __future__ import annotations

import random

import torch

from padrec_vllm.catalog.tokens import BOS_ID, EOS_ID, PAD_ID, REC_ID, SEP_ID, TokenLayout
from padrec_vllm.model.config import HeadConfig
from padrec_vllm.model.head import DraftHead

LAYOUT = TokenLayout((8, 8, 8, 4))  # vocab 33, 6 slots


def tiny_config(**overrides):
    from transformers import LlamaConfig

    fields = dict(
        vocab_size=LAYOUT.vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        initializer_range=0.2,  # large enough that random greedy outputs vary
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )
    fields.update(overrides)
    return LlamaConfig(**fields)


def tiny_target(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(**overrides)).eval()


def tiny_head(target, kind: str, *, num_steps: int = 3, seed: int = 1, **switches) -> DraftHead:
    torch.manual_seed(seed)
    config = HeadConfig.from_target(
        target.config, kind, num_slots=LAYOUT.num_slots, num_steps=num_steps, **switches
    )
    return DraftHead(config, LAYOUT.slot_tensor()).eval()


def random_prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    """``<bos> <sid tokens...> <sep>... <rec>``-shaped prompts of the given total lengths (>= 2)."""
    rng = random.Random(seed)
    prompts = []
    for n in lengths:
        body = []
        while len(body) < n - 2:
            level = len(body) % LAYOUT.tokens_per_item
            if level == LAYOUT.num_levels:
                body.append(SEP_ID)
            else:
                body.append(LAYOUT.token_id(level, rng.randrange(LAYOUT.codebook_sizes[level])))
        prompts.append([BOS_ID, *body, REC_ID])
    return prompts


EPS32 = torch.finfo(torch.float32).eps


def assert_close_to_rounding(got: torch.Tensor, want: torch.Tensor, terms: int) -> None:
    """``got`` equals ``want`` up to the float32 rounding of two computation orders.

    Summing n float32 terms in another order moves the sum by at most about n * eps times the
    terms' magnitude (the standard bound); along a chain of sums the errors add to first order,
    so ``terms`` is the total length of the sums an output element goes through, and the
    output's largest magnitude stands for the terms' magnitude: the bound per element is
    ``terms * eps * max|want|``. A wrong term, step or mask moves outputs by a fraction of
    their scale, orders of magnitude above this.
    """
    bound = terms * EPS32 * float(want.abs().max())
    err = float((got.float() - want.float()).abs().max())
    assert err <= bound, f"max |got - want| = {err:.3g} > {bound:.3g} ({terms} terms)"
