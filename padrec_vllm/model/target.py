"""The target recommender: a Hugging Face ``LlamaForCausalLM`` over the SID vocabulary.

Saved with ``save_pretrained`` (``config.json`` + ``model.safetensors``) next to a copy of the
tokenizer, so both ``transformers`` and vLLM load the directory as it is.
"""

from __future__ import annotations

from pathlib import Path

import torch

from padrec_vllm.catalog.tokens import BOS_ID, EOS_ID, PAD_ID, TokenLayout
from padrec_vllm.errors import UserError
from padrec_vllm.model.skinny_linear import use_skinny_linears
from padrec_vllm.presets import TargetPreset


def target_config(preset: TargetPreset, layout: TokenLayout):
    from transformers import LlamaConfig

    per_item = layout.tokens_per_item
    max_len = 2 + preset.history * per_item + preset.list_len * per_item + 1
    return LlamaConfig(
        vocab_size=layout.vocab_size,
        hidden_size=preset.hidden_size,
        intermediate_size=preset.intermediate_size,
        num_hidden_layers=preset.num_layers,
        num_attention_heads=preset.num_heads,
        num_key_value_heads=preset.num_heads,
        max_position_embeddings=max(256, 1 << (max_len - 1).bit_length()),
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
    )


def new_target(preset: TargetPreset, layout: TokenLayout, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(target_config(preset, layout))


def load_target(path: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """Load a saved target in eval mode, its linears as ``SkinnyLinear`` (cheap few-token CPU
    forwards). Raises UserError when the directory is not a checkpoint."""
    from transformers import LlamaForCausalLM

    if not (Path(path) / "config.json").is_file():
        raise UserError(f"no target checkpoint at {path} (missing config.json; run `padrec build`)")
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype)
    use_skinny_linears(model)
    return model.to(device).eval()
