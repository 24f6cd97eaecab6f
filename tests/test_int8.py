"""Int8 drafting: close to the float head, lossless in chain and tree decoding, the float head
untouched."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from padrec_vllm.decoding import TreeSpec, generate, identical_output_rate
from padrec_vllm.model.decoding_head import decoding_head
from padrec_vllm.model.int8_linear import Int8Linear
from tiny_models import tiny_head

pytestmark = pytest.mark.usefixtures("one_thread")


def test_int8_linear_is_close_to_float():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    x = torch.randn(3, 5, 64)  # [B, T, in]
    want = lin(x)
    got = Int8Linear(lin)(x)
    assert got.shape == want.shape == (3, 5, 48)
    # weights and activations each rounded to 1/254 of their largest magnitude (weights to 1/126
    # without VNNI, int8_linear's docstring): about 1% of the output's norm for Gaussian inputs
    # (max/rms ~ 3), so 2% allows for both
    assert (got - want).norm() / want.norm() < 0.02


def test_int8_weights_take_7_bits_without_vnni(monkeypatch):
    """fbgemm saturates pairs of full-range products without AVX-512 VNNI: 7-bit weights there,
    8-bit with VNNI."""
    from padrec_vllm.model import int8_linear

    for flags, reduce in (("fpu avx2 fma", True), ("fpu avx512f avx512_vnni", False)):
        monkeypatch.setattr(int8_linear.Path, "read_text", lambda self, f=flags: f)
        int8_linear.fbgemm_needs_reduce_range.cache_clear()
        try:
            layer = Int8Linear(nn.Linear(8, 4))
        finally:
            int8_linear.fbgemm_needs_reduce_range.cache_clear()
        assert layer.reduce_range is reduce
        assert f"{7 if reduce else 8}-bit weights" in repr(layer)


@pytest.mark.parametrize("kind", ["eagle", "padrec"])
def test_int8_decoding_head_tracks_the_float_head(target, kind):
    head = tiny_head(target, kind, num_steps=3)
    q = decoding_head(head, target, int8=True)
    assert all(type(m) is not Int8Linear for m in head.modules())  # the float head is untouched
    assert sum(type(m) is Int8Linear for m in q.layer.modules()) == 7  # the layer's linears
    assert type(q.lm_head) is Int8Linear and type(q.feature_proj) is Int8Linear  # logits, fold
    torch.manual_seed(0)
    ids = torch.randint(3, 30, (2, 7))  # [B, T]
    feats = torch.randn(2, 7, target.config.hidden_size)  # [B, T, H]
    pos = torch.arange(7).expand(2, 7)  # [B, T]
    embed = target.get_input_embeddings()
    with torch.inference_mode():
        hidden = head(ids, feats, pos, step=1, embed=embed, cache=head.new_cache(2, 16))
        want = head.logits(hidden, target.lm_head)
        hidden = q(ids, feats, pos, step=1, embed=embed, cache=q.new_cache(2, 16))
        got = q.logits(hidden, target.lm_head)
    # nine int8 linears (the fold, the layer's seven, lm_head), each about 1% off (test above),
    # up to five of them in sequence: 5% on the logits; 8% with 7-bit weights (twice the weight
    # rounding of 8 bits; 6.3% seen on an AVX2 CPU)
    bound = 0.08 if q.lm_head.reduce_range else 0.05
    assert (got - want).norm() / want.norm() < bound
    # a random head has near-ties among its top tokens, which 5% noise may swap
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() >= 0.85


@pytest.mark.parametrize("batch_size", [1, 4])
@pytest.mark.parametrize("tree", [None, TreeSpec(6, 2, 0.01)])
def test_int8_drafting_is_lossless(target, prompts, batch_size, tree):
    q = decoding_head(tiny_head(target, "padrec", num_steps=3), target, int8=True)
    plain = generate(target, prompts, max_new_tokens=20, eos_id=None, batch_size=batch_size)
    spec = generate(target, prompts, max_new_tokens=20, eos_id=None, batch_size=batch_size,
                    head=q, tree=tree)
    assert identical_output_rate(spec, plain) == 1.0


def test_int8_needs_a_float32_head(target):
    head = tiny_head(target, "eagle", num_steps=3).to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 head on CPU"):
        decoding_head(head, target, int8=True)
