"""Int8 draft heads: close to the float head, lossless in chain and tree decoding, the float head
untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from padrec_vllm.decoding import TreeSpec, generate, identical_output_rate
from padrec_vllm.model.int8_linear import Int8Linear, quantize_head
from tiny_models import tiny_head

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)  # [B, T, in]
    want = lin(x)
    got = Int8Linear(lin)(x)
    assert got.shape == want.shape == (3, 5, 48)
    assert (got - want).norm() / want.norm() < 0.02


@pytest.mark.parametrize("kind", ["eagle", "padrec"])
def test_quantized_head_tracks_the_float_head(target, kind):
    head = tiny_head(target, kind, num_steps=3)
    q = quantize_head(head, target)
    assert all(type(m) is not Int8Linear for m in head.modules())  # the float head is untouched
    assert sum(type(m) is Int8Linear for m in q.modules()) == 9  # 7 layer linears, lm_head, fold
    torch.manual_seed(0)
    ids = torch.randint(3, 30, (2, 7))  # [B, T]
    feats = torch.randn(2, 7, target.config.hidden_size)  # [B, T, H]
    pos = torch.arange(7).expand(2, 7)  # [B, T]
    embed = target.get_input_embeddings()
    with torch.inference_mode():
        want = head.logits(head(ids, feats, pos, step=1, embed=embed, cache=head.new_cache(2, 16)), target.lm_head)
        got = q.logits(q(ids, feats, pos, step=1, embed=embed, cache=q.new_cache(2, 16)), target.lm_head)
    assert (got - want).norm() / want.norm() < 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("tree", [None, TreeSpec(6, 2, 0.01)])
def test_int8_drafting_is_lossless(target, prompts, batch_size, tree):
    q = quantize_head(tiny_head(target, "padrec", num_steps=3), target)
    plain = generate(target, prompts, max_new_tokens=20, eos_id=None, batch_size=batch_size)
    spec = generate(target, prompts, max_new_tokens=20, eos_id=None, batch_size=batch_size, head=q, tree=tree)
    assert identical_output_rate(spec, plain) == 1.0


def test_quantize_head_needs_float32(target):
    head = tiny_head(target, "eagle", num_steps=3).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 head on CPU"):
        quantize_head(head, target)
