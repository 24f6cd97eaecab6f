"""Draft heads: parameters, the EAGLE-1 layer against Hugging Face's, the PAD-Rec formula, the
position-addressed cache, the decoding form (folded on CPU, fused on CUDA), and checkpoints.

Float comparisons use ``assert_close_to_rounding`` (tests/tiny_models.py): two orders of the same
float32 math agree within ``n * eps * max|want|``, n the length of the sums involved."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from safetensors.torch import load_file

from padrec_vllm.model.config import HeadConfig
from padrec_vllm.model.decoding_head import decoding_head
from padrec_vllm.model.head import DraftHead
from padrec_vllm.model.head_checkpoint import load_head, save_head
from padrec_vllm.model.layers import rope_cos_sin, rope_table
from padrec_vllm.model.padrec_terms import add_padrec_terms
from padrec_vllm.model.skinny_linear import SkinnyLinear, use_skinny_linears
from tiny_models import LAYOUT, assert_close_to_rounding, tiny_head, tiny_target

EAGLE_PARAMS = {
    "fc.weight": (64, 128),
    "layers.0.self_attn.q_proj.weight": (64, 64),
    "layers.0.self_attn.k_proj.weight": (32, 64),
    "layers.0.self_attn.v_proj.weight": (32, 64),
    "layers.0.self_attn.o_proj.weight": (64, 64),
    "layers.0.post_attention_layernorm.weight": (64,),
    "layers.0.mlp.gate_proj.weight": (128, 64),
    "layers.0.mlp.up_proj.weight": (128, 64),
    "layers.0.mlp.down_proj.weight": (64, 128),
}
ITEM = {"padrec.alpha": (1,), "padrec.item_emb.weight": (LAYOUT.num_slots, 64)}
STEP = {"padrec.step_emb.weight": (4, 64)}  # num_steps 3 + unused row 0
GATE = {"padrec.gate.weight": (1, 128), "padrec.gate.bias": (1,)}
H = 64  # hidden size of the tiny models
# the sums a head output goes through, by length: fc over [emb; f] (2H), a q/k/v projection (H),
# attention scores (head_dim 16), weights x values (at most 16 cached slots), o_proj (H), the
# MLP's gate/up (H) and down_proj (intermediate 2H)
SUMS = 2 * H + H + 16 + 16 + H + H + 2 * H


pytestmark = pytest.mark.usefixtures("one_thread")


def _shapes(head: DraftHead) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in head.state_dict().items()}


@pytest.mark.parametrize(
    ("kind", "switches", "extra"),
    [
        ("eagle", {}, {}),
        ("padrec", {}, {**ITEM, **STEP, **GATE}),
        ("padrec", {"use_item_emb": False}, {**STEP, **GATE}),
        ("padrec", {"use_gate": False}, {**ITEM, **STEP}),
        ("padrec", {"use_step_emb": False}, ITEM),
        ("padrec", {"use_item_emb": False, "use_step_emb": False}, {}),
    ],
)
def test_parameter_set(target, kind, switches, extra):
    head = tiny_head(target, kind, **switches)
    assert _shapes(head) == {**EAGLE_PARAMS, **extra}
    assert not any(p.startswith(("embed_tokens", "lm_head")) for p in head.state_dict())


def test_every_variant_starts_from_the_same_body_under_one_seed(target):
    """A controlled comparison: the PAD-Rec extras do not shift the shared body's initialisation."""
    eagle = tiny_head(target, "eagle", seed=7).state_dict()
    for switches in ({}, {"use_item_emb": False}, {"use_step_emb": False}, {"use_gate": False}):
        padrec = tiny_head(target, "padrec", seed=7, **switches).state_dict()
        for name, weight in eagle.items():
            assert torch.equal(padrec[name], weight), (switches, name)
    other = tiny_head(target, "eagle", seed=8).state_dict()
    assert not torch.equal(other["fc.weight"], eagle["fc.weight"])


def test_slot_table_matches_layout(target):
    head = tiny_head(target, "padrec")
    table = head.slot_of_token.tolist()
    assert len(table) == LAYOUT.vocab_size
    assert table == [LAYOUT.decode_id(i)[0] for i in range(LAYOUT.vocab_size)]


def test_config_from_target(target):
    c = HeadConfig.from_target(target.config, "padrec", num_slots=6, num_steps=5)
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads) == (64, 4, 2)
    assert c.head_dim == 16
    assert (c.rope_theta, c.vocab_size, c.intermediate_size) == (10000.0, LAYOUT.vocab_size, 128)
    with pytest.raises(ValueError):
        HeadConfig.from_target(target.config, "medusa", num_slots=6, num_steps=5)
    with pytest.raises(ValueError):  # padrec item embeddings need the slot table
        DraftHead(c)


def test_layer_matches_hf_llama_layer(target):
    """Our layer = HF LlamaDecoderLayer without input_layernorm (RoPE, GQA, norm, SwiGLU)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    head = tiny_head(target, "eagle")
    layer = head.layers[0]
    with torch.no_grad():  # not near-identity weights, so a mismatch would show
        for p in layer.parameters():
            p.normal_(0, 0.3)
    config = copy.deepcopy(target.config)
    config._attn_implementation = "eager"
    hf = LlamaDecoderLayer(config, layer_idx=0).eval()
    hf.input_layernorm = torch.nn.Identity()
    missing = hf.load_state_dict(layer.state_dict(), strict=False)
    assert missing.missing_keys == [] and missing.unexpected_keys == []

    torch.manual_seed(0)
    u = torch.randn(2, 7, 64)  # [B, T, H]
    pos = torch.stack([torch.arange(7), torch.arange(7) + 11])  # [B, T]
    causal = torch.full((7, 7), float("-inf")).triu(1)[None, None]  # [1, 1, T, T]
    with torch.no_grad():
        rope = LlamaRotaryEmbedding(config)(u, pos)
        want = hf(u, attention_mask=causal, position_embeddings=rope)
        cos, sin = rope_cos_sin(pos, 16, 10000.0, u.dtype)
        got = layer(u, cos, sin, pos, None, None)
    assert_close_to_rounding(got, want, SUMS)  # eager attention against SDPA: other sum orders


def _formula_float64(head: DraftHead, embed, ids, feats, pos, step: int) -> torch.Tensor:
    """The module docstring's formula, written out in float64 -> [B, T, H]."""
    head, embed = copy.deepcopy(head).double(), copy.deepcopy(embed).double()
    p = head.padrec
    with torch.no_grad():
        u = head.fc(torch.cat((embed(ids), feats.double()), -1))  # [B, T, H]
        u = u + p.alpha * p.item_emb.weight[LAYOUT.slot_tensor()[ids]]
        s = p.step_emb.weight[step].expand_as(u)  # [B, T, H]
        g = torch.sigmoid(p.gate(torch.cat((u, s), -1)))  # [B, T, 1]
        u = u + g * s
        cos, sin = rope_cos_sin(pos, 16, 10000.0, u.dtype)
        return head.layers[0](u, cos, sin, pos, None, None)


def test_padrec_forward_follows_the_formula(target):
    """Both forms against the formula in float64, so only their own float32 rounding counts."""
    head = tiny_head(target, "padrec")
    with torch.no_grad():
        head.padrec.alpha.fill_(0.7)
        head.padrec.gate.bias.fill_(0.3)
    embed = target.get_input_embeddings()
    torch.manual_seed(0)
    ids = torch.randint(0, LAYOUT.vocab_size, (2, 5))  # [B, T]
    feats = torch.randn(2, 5, 64)  # [B, T, H]
    pos = torch.arange(5).expand(2, -1)  # [B, T]
    want = _formula_float64(head, embed, ids, feats, pos, step=2)
    decoding = decoding_head(head, target)
    with torch.no_grad():
        got = head(ids, feats, pos, step=2, embed=embed)
        folded = decoding(ids, feats, pos, step=2, embed=embed, cache=decoding.new_cache(2, 16))
        assert_close_to_rounding(got, want, SUMS)
        assert_close_to_rounding(folded, want, SUMS)
        # steps beyond num_steps reuse the last step embedding; step 0 does not exist
        for drafter in (head, decoding):
            cache = drafter.new_cache(2, 16) if drafter is decoding else None
            far = drafter(ids, feats, pos, step=9, embed=embed, cache=cache)
            last = drafter(ids, feats, pos, step=3, embed=embed, cache=cache)
            torch.testing.assert_close(far, last, rtol=0, atol=0)
        assert not torch.allclose(got, head(ids, feats, pos, step=1, embed=embed))
        with pytest.raises(ValueError):
            head(ids, feats, pos, step=0, embed=embed)
        with pytest.raises(ValueError):
            decoding(ids, feats, pos, step=0, embed=embed, cache=decoding.new_cache(2, 16))


def test_forward_follows_parameters_and_training_gets_gradients(target):
    head = tiny_head(target, "padrec")
    embed = target.get_input_embeddings()
    torch.manual_seed(0)
    ids, feats = torch.randint(0, LAYOUT.vocab_size, (2, 5)), torch.randn(2, 5, 64)
    args = (ids, feats, torch.arange(5).expand(2, -1))
    with torch.no_grad():
        before = head(*args, step=2, embed=embed)
        head.padrec.alpha.mul_(3.0)  # like an optimizer step: in place
        after = head(*args, step=2, embed=embed)
    assert not torch.allclose(before, after)
    trained = head(*args, step=2, embed=embed)  # grad enabled: same math (kernels may differ)
    assert_close_to_rounding(trained.detach(), after, SUMS)
    trained.square().sum().backward()
    for name in ("alpha", "item_emb.weight", "step_emb.weight", "gate.weight", "gate.bias"):
        grad = head.padrec.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("form", ["head", "decoding"])
@pytest.mark.parametrize("kind", ["eagle", "padrec"])
def test_cache_matches_full_forward(target, kind, form):
    """Incremental calls with a HeadCache (blocks, padding, stale slots) = one causal pass."""
    head = tiny_head(target, kind)
    embed = target.get_input_embeddings()
    drafter = head if form == "head" else decoding_head(head, target)
    torch.manual_seed(0)
    ids = torch.randint(0, LAYOUT.vocab_size, (2, 9))  # [B, T]
    feats = torch.randn(2, 9, 64)  # [B, T, H]
    pos = torch.arange(9).expand(2, -1)  # [B, T]
    with torch.no_grad():
        full = head(ids, feats, pos, step=1, embed=embed)  # [B, T, H]
        cache = drafter.new_cache(2, 16)
        # stale garbage at positions 4..8 (like drafts of a rejected round)
        junk = torch.randn(2, 5, 64)
        drafter(ids.flip(1)[:, :5], junk, pos[:, 4:9], step=2, embed=embed, cache=cache)
        drafter(ids[:, :4], feats[:, :4], pos[:, :4], step=1, embed=embed, cache=cache)
        part = [drafter(ids[:, 4:7], feats[:, 4:7], pos[:, 4:7], step=1, embed=embed, cache=cache)]
        part.append(drafter(ids[:, 7:9], feats[:, 7:9], pos[:, 7:9], step=1, embed=embed,
                            cache=cache))
    # attention over 16 cached slots against 9 keys, and the fold: other sum orders only
    assert_close_to_rounding(torch.cat(part, 1), full[:, 4:], SUMS)


def test_padding_mask_in_training_mode(target):
    head = tiny_head(target, "padrec")
    embed = target.get_input_embeddings()
    torch.manual_seed(0)
    ids = torch.randint(0, LAYOUT.vocab_size, (2, 6))
    feats = torch.randn(2, 6, 64)
    pos = torch.arange(6).expand(2, -1)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # row 1 left-padded by 2
    with torch.no_grad():
        batched = head(ids, feats, pos, step=1, embed=embed, attention_mask=mask)
        alone = head(ids[1:, 2:], feats[1:, 2:], pos[1:, 2:], step=1, embed=embed)
        assert torch.isfinite(batched).all()
    # padding keys masked out of 6 against 4 keys in all: other sum orders only
    assert_close_to_rounding(batched[1:, 2:], alone, SUMS)


@pytest.mark.parametrize(
    ("kind", "switches", "arch"),
    [
        ("eagle", {}, "EagleLlamaForCausalLM"),
        ("padrec", {}, "EaglePadRecLlamaForCausalLM"),
        ("padrec", {"use_gate": False}, "EaglePadRecLlamaForCausalLM"),
    ],
)
def test_save_load_roundtrip(target, tmp_path, kind, switches, arch):
    head = tiny_head(target, kind, **switches)
    with torch.no_grad():  # move the extras off their init so a lost parameter would show
        for p in head.parameters():
            p.add_(0.05 * torch.randn_like(p))
    save_head(head, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == [arch] and config["num_hidden_layers"] == 1
    assert config["padrec_kind"] == kind and config["padrec_num_steps"] == 3
    assert config["padrec_num_slots"] == LAYOUT.num_slots
    assert config["padrec_slot_of_token"] == LAYOUT.slot_table()
    assert config["padrec_use_gate"] == switches.get("use_gate", True)
    assert config["hidden_size"] == 64 and config["vocab_size"] == LAYOUT.vocab_size
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(head.state_dict())

    loaded = load_head(tmp_path)
    use_skinny_linears(head)  # as load_head does, so both run the same kernels
    assert loaded.config == head.config
    assert loaded.slot_of_token.tolist() == LAYOUT.slot_table()
    embed, lm_head = target.get_input_embeddings(), target.lm_head
    torch.manual_seed(0)
    ids = torch.randint(0, LAYOUT.vocab_size, (2, 5))
    feats = torch.randn(2, 5, 64)
    pos = torch.arange(5).expand(2, -1)
    with torch.no_grad():
        for step in (1, 2, 3):
            want = head.logits(head(ids, feats, pos, step=step, embed=embed), lm_head)
            got = loaded.logits(loaded(ids, feats, pos, step=step, embed=embed), lm_head)
            assert torch.equal(got, want)


VARIANTS = [("eagle", {}), ("padrec", {}), ("padrec", {"use_gate": False}),
            ("padrec", {"use_step_emb": False}), ("padrec", {"use_item_emb": False})]


@pytest.mark.parametrize("kind,switches", VARIANTS,
                         ids=["eagle", "padrec", "no_gate", "no_step", "no_item"])
def test_cpu_decoding_form_matches_the_head_and_is_a_snapshot(target, kind, switches):
    """The fold gives the head's outputs at every step; it keeps the parameters it was built
    from (a snapshot), and one built after an update follows the update."""
    target = copy.deepcopy(target)  # its embedding is updated below
    head = tiny_head(target, kind, **switches)
    embed = target.get_input_embeddings()
    torch.manual_seed(0)
    with torch.no_grad():
        for prm in head.parameters():  # move every PAD-Rec term away from its small init
            prm.add_(0.2 * torch.randn_like(prm))
    ids, feats = torch.randint(0, LAYOUT.vocab_size, (2, 5)), torch.randn(2, 5, 64)
    args = (ids, feats, torch.arange(5).expand(2, -1))

    def check(decoding, step: int) -> torch.Tensor:
        """The decoding form's output, checked against the head's (up to rounding)."""
        with torch.no_grad():
            want = head(*args, step=step, embed=embed, cache=head.new_cache(2, 8))
            got = decoding(*args, step=step, embed=embed, cache=decoding.new_cache(2, 8))
        assert_close_to_rounding(got, want, SUMS)
        return got

    decoding = decoding_head(head, target)
    assert decoding.fold is not None  # the folded path runs on CPU
    first = [check(decoding, step) for step in (1, 2, 3, 4)]
    with torch.no_grad():  # in-place updates of the embedding and fc
        embed.weight.mul_(1.5)
        head.fc.weight.mul_(0.5)
    check(decoding_head(head, target), 2)
    with torch.no_grad():  # the old snapshot does not follow them
        again = decoding(*args, step=2, embed=embed, cache=decoding.new_cache(2, 8))
    torch.testing.assert_close(again, first[1], rtol=0, atol=0)
    # nor does it need to: replacing a parameter object, directly or through
    # load_state_dict(assign=True), is followed by building again
    head.fc.weight = torch.nn.Parameter(head.fc.weight.detach() * 2)
    check(decoding_head(head, target), 3)
    state = {name: t.detach() * 0.7 for name, t in head.state_dict().items()}
    head.load_state_dict(state, assign=True)
    check(decoding_head(head, target), 3)
    with pytest.raises(ValueError, match="input embedding"):
        decoding(*args, step=1, embed=copy.deepcopy(embed), cache=decoding.new_cache(2, 8))


@pytest.mark.parametrize("kind", ["eagle", "padrec"])
def test_fused_layer_matches_the_layer(target, kind):
    """The CPU decoding form's fused layer (one query at batch 1, blocks at batch 1, batches
    whose rows sit at different positions) gives the layer's outputs and cache entries, up to
    rounding; its logits are the target's."""
    head = tiny_head(target, kind)
    embed = target.get_input_embeddings()
    fused = decoding_head(head, target)
    plain = dataclasses.replace(fused, fused=None, lm_head_t=None)  # the layer, unfused
    assert fused.fused is not None and fused.lm_head_t is not None
    # cached slots for attention's sums (at most 48 below)
    sums = 2 * H + H + 16 + 48 + H + H + 2 * H
    torch.manual_seed(0)
    with torch.no_grad():
        for b, widths in ((1, [6, 1, 1, 4, 1]), (2, [6, 1, 3, 1])):
            caches = fused.new_cache(b, 48), plain.new_cache(b, 48)
            start = torch.arange(b)[:, None] * 5  # [B, 1]: rows at different positions
            for step, t in enumerate(widths, 1):
                ids = torch.randint(0, LAYOUT.vocab_size, (b, t))  # [B, T]
                feats = torch.randn(b, t, H)  # [B, T, H]
                pos = start + torch.arange(t)  # [B, T]
                got, want = (d(ids, feats, pos, step=step, embed=embed, cache=c)
                             for d, c in zip((fused, plain), caches))
                assert_close_to_rounding(got, want, sums)
                start = start + t
            for got, want in ((caches[0].keys, caches[1].keys),
                              (caches[0].values, caches[1].values)):
                assert_close_to_rounding(got, want, 2 * H)
        with pytest.raises(ValueError, match="consecutive"):
            fused(torch.tensor([[5, 6]]), torch.randn(1, 2, H), torch.tensor([[3, 5]]), step=2,
                  embed=embed, cache=fused.new_cache(1, 48))
        hidden = torch.randn(3, 1, H)  # [B, 1, H]
        assert_close_to_rounding(fused.logits(hidden, target.lm_head), target.lm_head(hidden), H)
        other = torch.nn.Linear(H, LAYOUT.vocab_size, bias=False)  # not the snapshot's lm_head
        torch.testing.assert_close(fused.logits(hidden, other), other(hidden))


def test_rope_table_rows_equal_the_computed_values(target):
    """The decoding form looks RoPE up in a table; beyond it (a larger cache) it computes them."""
    cfg = tiny_head(target, "eagle").config
    cos, sin = rope_table(40, cfg.head_dim, cfg.rope_theta, torch.float32, "cpu")  # [S, D]
    pos = torch.tensor([[0, 7, 39], [3, 3, 12]])  # [B, T]
    want_cos, want_sin = rope_cos_sin(pos, cfg.head_dim, cfg.rope_theta, torch.float32)
    assert torch.equal(cos[pos], want_cos) and torch.equal(sin[pos], want_sin)
    head = tiny_head(target, "padrec")
    decoding = decoding_head(head, target)
    embed = target.get_input_embeddings()
    big = cfg.max_position_embeddings + 8
    ids, feats = torch.randint(0, LAYOUT.vocab_size, (1, 3)), torch.randn(1, 3, 64)
    far = torch.tensor([[big - 3, big - 2, big - 1]])  # [1, T]: past the table
    with torch.no_grad():
        got = decoding(ids, feats, far, step=1, embed=embed, cache=decoding.new_cache(1, big))
        want = head(ids, feats, far, step=1, embed=embed, cache=head.new_cache(1, big))
    assert_close_to_rounding(got, want, SUMS)


@pytest.mark.gpu
def test_fused_cuda_kernel_matches_the_formula():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    from padrec_vllm.model.triton_terms import fused_padrec_terms

    target = tiny_target().to("cuda")
    head32 = tiny_head(target, "padrec").to("cuda")
    with torch.no_grad():
        for p in head32.padrec.parameters():
            p.add_(0.3 * torch.randn_like(p))
    head16 = copy.deepcopy(head32).to(torch.bfloat16)
    with torch.no_grad():  # both heads hold the same (bf16-representable) values
        head32.load_state_dict({k: v.float() for k, v in head16.state_dict().items()})
    assert decoding_head(head16, target.to(torch.bfloat16)).apply_terms is fused_padrec_terms
    torch.manual_seed(0)
    ids = torch.randint(0, LAYOUT.vocab_size, (3, 7), device="cuda")  # [B, T]
    u = torch.randn(3, 7, 64, device="cuda").to(torch.bfloat16)  # [B, T, H]
    with torch.inference_mode():
        terms32, terms16 = head32.terms(), head16.terms()
        for step in (1, 2, 5):
            k = head32.config.step_row(step)
            want = add_padrec_terms(u.float(), ids, terms32, k)
            # the gate logit is one H-term sum, summed in another order inside the kernel;
            # then the sigmoid and one multiply-add
            assert_close_to_rounding(fused_padrec_terms(u.float(), ids, terms32, k), want, H + 2)
            got = fused_padrec_terms(u, ids, terms16, k)  # fp32 inside, one bf16 rounding
            assert got.dtype == torch.bfloat16
            # bf16 rounds to 8 significant bits (2^-8 relative) in the item table, the step
            # logit and the result: a few such roundings
            torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_skinny_linear_matches_linear_and_keeps_training_on_the_plain_path():
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 80, bias=True)
    skinny = copy.deepcopy(plain)
    assert use_skinny_linears(skinny) == 1 and type(skinny) is SkinnyLinear
    assert skinny.state_dict().keys() == plain.state_dict().keys()
    # one row (W @ x^T, padded to two) and more (F.linear)
    for shape in [(1, 48), (1, 1, 48), (3, 5, 48), (2, 1, 48), (40, 48)]:
        x = torch.randn(*shape)
        with torch.inference_mode():
            want, got = plain(x), skinny(x)
        assert got.shape == want.shape and got.is_contiguous()
        assert_close_to_rounding(got, want, 48)  # 48-term sums in another order
    x = torch.randn(2, 3, 48)
    skinny(x).sum().backward()  # gradients flow through the training path
    assert skinny.weight.grad is not None and skinny.weight.grad.shape == (80, 48)
