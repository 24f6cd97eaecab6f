"""Draft heads: parameters, the EAGLE-1 layer against Hugging Face's, the PAD-Rec formula, the
position-addressed cache, and checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from padrec_vllm.model.head_checkpoint import load_head, save_head
from padrec_vllm.model.heads import DraftHead, HeadConfig, rope_cos_sin
from padrec_vllm.model.skinny_linear import SkinnyLinear, use_skinny_linears
from tiny_models import LAYOUT, tiny_head, tiny_target

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
    assert not torch.equal(tiny_head(target, "eagle", seed=8).state_dict()["fc.weight"], eagle["fc.weight"])


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
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_padrec_forward_follows_the_formula(target):
    head = tiny_head(target, "padrec")
    with torch.no_grad():
        head.padrec.alpha.fill_(0.7)
        head.padrec.gate.bias.fill_(0.3)
    embed = target.get_input_embeddings()
    torch.manual_seed(0)
    ids = torch.randint(0, LAYOUT.vocab_size, (2, 5))  # [B, T]
    feats = torch.randn(2, 5, 64)  # [B, T, H]
    pos = torch.arange(5).expand(2, -1)  # [B, T]
    p = head.padrec
    with torch.no_grad():
        u = head.fc(torch.cat((embed(ids), feats), -1))
        u = u + p.alpha * p.item_emb.weight[LAYOUT.slot_tensor()[ids]]
        s = p.step_emb.weight[2].expand_as(u)
        g = torch.sigmoid(p.gate(torch.cat((u, s), -1)))  # [B, T, 1]
        u = u + g * s
        cos, sin = rope_cos_sin(pos, 16, 10000.0, u.dtype)
        want = head.layers[0](u, cos, sin, pos, None, None)
        got = head(ids, feats, pos, step=2, embed=embed)
        torch.testing.assert_close(got, want)
        # steps beyond num_steps reuse the last step embedding; step 0 does not exist
        torch.testing.assert_close(
            head(ids, feats, pos, step=9, embed=embed), head(ids, feats, pos, step=3, embed=embed)
        )
        assert not torch.allclose(got, head(ids, feats, pos, step=1, embed=embed))
        with pytest.raises(ValueError):
            head(ids, feats, pos, step=0, embed=embed)


def test_padrec_terms_cache_follows_parameters_and_training_gets_gradients(target):
    head = tiny_head(target, "padrec")
    embed = target.get_input_embeddings()
    torch.manual_seed(0)
    ids, feats = torch.randint(0, LAYOUT.vocab_size, (2, 5)), torch.randn(2, 5, 64)
    args = (ids, feats, torch.arange(5).expand(2, -1))
    with torch.no_grad():
        before = head(*args, step=2, embed=embed)  # fills the inference cache
        head.padrec.alpha.mul_(3.0)  # like an optimizer step: in place
        after = head(*args, step=2, embed=embed)
    assert not torch.allclose(before, after)
    trained = head(*args, step=2, embed=embed)  # grad enabled: computed afresh
    torch.testing.assert_close(trained.detach(), after)
    trained.square().sum().backward()
    for name in ("alpha", "item_emb.weight", "step_emb.weight", "gate.weight", "gate.bias"):
        grad = head.padrec.get_parameter(name).grad
        assert grad is not None and grad.abs().sum() > 0, name


@pytest.mark.parametrize("kind", ["eagle", "padrec"])
def test_cache_matches_full_forward(target, kind):
    """Incremental calls with a HeadCache (blocks, padding, stale slots) = one causal pass."""
    head = tiny_head(target, kind)
    embed = target.get_input_embeddings()
    torch.manual_seed(0)
    ids = torch.randint(0, LAYOUT.vocab_size, (2, 9))  # [B, T]
    feats = torch.randn(2, 9, 64)  # [B, T, H]
    pos = torch.arange(9).expand(2, -1)  # [B, T]
    with torch.no_grad():
        full = head(ids, feats, pos, step=1, embed=embed)  # [B, T, H]
        cache = head.new_cache(2, 16)
        # stale garbage at positions 4..8 (like drafts of a rejected round)
        junk = torch.randn(2, 5, 64)
        head(ids.flip(1)[:, :5], junk, pos[:, 4:9], step=2, embed=embed, cache=cache)
        head(ids[:, :4], feats[:, :4], pos[:, :4], step=1, embed=embed, cache=cache)
        part = [head(ids[:, 4:7], feats[:, 4:7], pos[:, 4:7], step=1, embed=embed, cache=cache)]
        part.append(head(ids[:, 7:9], feats[:, 7:9], pos[:, 7:9], step=1, embed=embed, cache=cache))
    torch.testing.assert_close(torch.cat(part, 1), full[:, 4:], atol=1e-4, rtol=1e-4)


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
    torch.testing.assert_close(batched[1:, 2:], alone, atol=1e-4, rtol=1e-4)


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


@pytest.mark.parametrize("kind,switches", VARIANTS, ids=["eagle", "padrec", "no_gate", "no_step", "no_item"])
def test_cpu_folded_inference_matches_the_unfolded_form_and_follows_updates(target, kind, switches):
    head = tiny_head(target, kind, **switches)
    embed = copy.deepcopy(target.get_input_embeddings())
    torch.manual_seed(0)
    with torch.no_grad():
        for prm in head.parameters():  # move every PAD-Rec term away from its small init
            prm.add_(0.2 * torch.randn_like(prm))
    ids, feats = torch.randint(0, LAYOUT.vocab_size, (2, 5)), torch.randn(2, 5, 64)
    args = (ids, feats, torch.arange(5).expand(2, -1))
    for step in (1, 2, 3, 4):
        unfolded = head(*args, step=step, embed=embed).detach()  # grad enabled: unfolded path
        with torch.no_grad():
            folded = head(*args, step=step, embed=embed)
            assert head._tables_key is not None  # the folded path ran
        torch.testing.assert_close(folded, unfolded, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # in-place updates of the embedding or fc invalidate the tables
        embed.weight.mul_(1.5)
        head.fc.weight.mul_(0.5)
        folded = head(*args, step=2, embed=embed)
    torch.testing.assert_close(folded, head(*args, step=2, embed=embed).detach(), atol=1e-4, rtol=1e-4)
    # so does replacing a parameter object, directly or through load_state_dict(assign=True)
    head.fc.weight = torch.nn.Parameter(head.fc.weight.detach() * 2)
    with torch.no_grad():
        folded = head(*args, step=3, embed=embed)
    torch.testing.assert_close(folded, head(*args, step=3, embed=embed).detach(), atol=1e-4, rtol=1e-4)
    state = {name: t.detach() * 0.7 for name, t in head.state_dict().items()}
    head.load_state_dict(state, assign=True)
    with torch.no_grad():
        folded = head(*args, step=3, embed=embed)
    torch.testing.assert_close(folded, head(*args, step=3, embed=embed).detach(), atol=1e-4, rtol=1e-4)


@pytest.mark.gpu
def test_fused_cuda_kernel_matches_the_formula():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    target = tiny_target().to("cuda")
    head32 = tiny_head(target, "padrec").to("cuda")
    with torch.no_grad():
        for p in head32.padrec.parameters():
            p.add_(0.3 * torch.randn_like(p))
    head16 = copy.deepcopy(head32).to(torch.bfloat16)
    with torch.no_grad():  # both heads hold the same (bf16-representable) values
        head32.load_state_dict({k: v.float() for k, v in head16.state_dict().items()})
    torch.manual_seed(0)
    ids = torch.randint(0, LAYOUT.vocab_size, (3, 7), device="cuda")  # [B, T]
    u = torch.randn(3, 7, 64, device="cuda").to(torch.bfloat16)  # [B, T, H]
    with torch.inference_mode():
        for step in (1, 2, 5):
            head32.fused_kernel = False
            want = head32._add_positions(u.float(), ids, step)
            head32.fused_kernel = True
            torch.testing.assert_close(head32._add_positions(u.float(), ids, step), want)
            got = head16._add_positions(u, ids, step)  # fp32 inside, one bf16 rounding at the end
            assert got.dtype == torch.bfloat16
            torch.testing.assert_close(got.float(), want, atol=2e-2, rtol=2e-2)


def test_skinny_linear_matches_linear_and_keeps_training_on_the_plain_path():
    torch.manual_seed(0)
    plain = torch.nn.Linear(48, 80, bias=True)
    skinny = copy.deepcopy(plain)
    assert use_skinny_linears(skinny) == 1 and type(skinny) is SkinnyLinear
    assert skinny.state_dict().keys() == plain.state_dict().keys()
    for shape in [(1, 48), (3, 5, 48), (2, 1, 48), (40, 48)]:  # few rows (W @ x^T) and many (F.linear)
        x = torch.randn(*shape)
        with torch.inference_mode():
            want, got = plain(x), skinny(x)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    x = torch.randn(2, 3, 48)
    skinny(x).sum().backward()  # gradients flow through the training path
    assert skinny.weight.grad is not None and skinny.weight.grad.shape == (80, 48)
