"""Draft-head checkpoints: a directory vLLM 0.32 loads as an EAGLE-1 draft (docs/DESIGN.md).

``config.json`` is a LlamaConfig dict in the target's space with ``num_hidden_layers: 1`` and
``architectures`` = ``[config.ARCHITECTURES[kind]]``:
- eagle:  ``EagleLlamaForCausalLM`` — vLLM's registry name of its stock EAGLE-1 Llama draft
  (``llama_eagle.EagleLlamaForCausalLM``; vLLM keeps names that already start with ``Eagle``);
- padrec: ``PADREC_ARCHITECTURE`` — registered by our vLLM plugin.
plus these fields (written for both kinds):
- ``padrec_kind``: "eagle" | "padrec";
- ``padrec_num_slots``, ``padrec_num_steps`` (K the head was trained for);
- ``padrec_token_format``: "per-level" | "shared" (``catalog.tokens.TOKEN_FORMATS``; absent in
  checkpoints from before the shared format, which are per-level);
- ``padrec_slot_rule``: "token" (per-level: the slot is a function of the token id) |
  "position" (shared: a code token's slot is ``(q - padrec_slot_offset) mod padrec_slot_period``
  for its position q; ``padrec_slot_period`` = L + 1, ``padrec_slot_offset`` = 1);
- ``padrec_slot_of_token``: the full token-id -> slot table, a list of ``vocab_size`` ints, -1
  for the tokens whose slot comes from their position (omitted with the other slot fields when
  the head has no rule, which only an eagle head may);
- ``padrec_use_item_emb``, ``padrec_use_step_emb``, ``padrec_use_gate``: the ablation switches.

``model.safetensors`` holds (no ``embed_tokens``, no ``lm_head``: vLLM shares the target's):
- EAGLE-1 names: ``fc.weight`` [H, 2H]; ``layers.0.self_attn.{q,k,v,o}_proj.weight``;
  ``layers.0.post_attention_layernorm.weight`` [H]; ``layers.0.mlp.{gate,up,down}_proj.weight``;
- PAD-Rec names, present as the switches say: ``padrec.alpha`` [1], ``padrec.item_emb.weight``
  [num_slots, H], ``padrec.step_emb.weight`` [K+1, H] (row k = draft step k, row 0 unused),
  ``padrec.gate.weight`` [1, 2H] (first H columns act on u, last H on step_emb[k]),
  ``padrec.gate.bias`` [1].
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from padrec_vllm.catalog.tokens import SlotRule
from padrec_vllm.model.config import ARCHITECTURES, HeadConfig
from padrec_vllm.model.head import DraftHead
from padrec_vllm.model.skinny_linear import use_skinny_linears

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def weight_shapes(c: HeadConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a head's ``model.safetensors`` and its shape (module docstring); the
    artifacts check compares a checkpoint's header with it."""
    h, q, kv = c.hidden_size, c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    shapes = {
        "fc.weight": (h, 2 * h),
        "layers.0.self_attn.q_proj.weight": (q, h),
        "layers.0.self_attn.k_proj.weight": (kv, h),
        "layers.0.self_attn.v_proj.weight": (kv, h),
        "layers.0.self_attn.o_proj.weight": (h, q),
        "layers.0.post_attention_layernorm.weight": (h,),
        "layers.0.mlp.gate_proj.weight": (c.intermediate_size, h),
        "layers.0.mlp.up_proj.weight": (c.intermediate_size, h),
        "layers.0.mlp.down_proj.weight": (h, c.intermediate_size),
    }
    if c.has_item_emb:
        shapes |= {"padrec.alpha": (1,), "padrec.item_emb.weight": (c.num_slots, h)}
    if c.has_step_emb:
        shapes["padrec.step_emb.weight"] = (c.num_steps + 1, h)
    if c.has_gate:
        shapes |= {"padrec.gate.weight": (1, 2 * h), "padrec.gate.bias": (1,)}
    return shapes


def head_config_dict(head: DraftHead) -> dict:
    """The ``config.json`` content of ``head``."""
    from transformers import LlamaConfig

    c = head.config
    llama = LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=1,
        num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=c.head_dim,
        hidden_act="silu",
        max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range,
        rms_norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_theta,
        tie_word_embeddings=False,
        bos_token_id=c.bos_token_id,
        eos_token_id=c.eos_token_id,
        pad_token_id=c.pad_token_id,
    ).to_dict()
    llama["architectures"] = [ARCHITECTURES[c.kind]]
    llama["dtype"] = str(head.fc.weight.dtype).removeprefix("torch.")
    llama.update(
        padrec_kind=c.kind,
        padrec_num_slots=c.num_slots,
        padrec_num_steps=c.num_steps,
        padrec_use_item_emb=c.use_item_emb,
        padrec_use_step_emb=c.use_step_emb,
        padrec_use_gate=c.use_gate,
    )
    if head.slot_rule is not None:
        llama.update(head.slot_rule.config_fields())
    return llama


def save_head(head: DraftHead, directory: str | Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` of ``head`` into ``directory``."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(head_config_dict(head), indent=2) + "\n")
    tensors = {name: t.detach().contiguous().cpu() for name, t in head.state_dict().items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    return out


def load_head(
    directory: str | Path,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | None = None,
) -> DraftHead:
    """Load a head saved by ``save_head``; ``dtype`` None keeps the checkpoint's. Its linears become
    ``SkinnyLinear`` (cheap few-token CPU forwards)."""
    from transformers import LlamaConfig

    d = Path(directory)
    if not (d / CONFIG_FILE).is_file() or not (d / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"no draft-head checkpoint at {d} (needs {CONFIG_FILE} + weights)")
    raw = json.loads((d / CONFIG_FILE).read_text())
    if "padrec_kind" not in raw:
        raise ValueError(f"{d / CONFIG_FILE} has no padrec_kind: not a padrec-vllm head checkpoint")
    config = HeadConfig.from_target(
        LlamaConfig.from_dict(raw),
        raw["padrec_kind"],
        num_slots=raw["padrec_num_slots"],
        num_steps=raw["padrec_num_steps"],
        use_item_emb=raw["padrec_use_item_emb"],
        use_step_emb=raw["padrec_use_step_emb"],
        use_gate=raw["padrec_use_gate"],
    )
    head = DraftHead(config, SlotRule.from_config_fields(raw, config.num_slots))
    state = load_file(str(d / WEIGHTS_FILE))
    head.load_state_dict(state, strict=True)
    use_skinny_linears(head)
    head = head.to(device)
    return head.to(dtype if dtype is not None else next(iter(state.values())).dtype)
