"""PAD-Rec draft head as a vLLM 0.32 EAGLE-1 model (docs/DESIGN.md).

Subclasses vLLM's ``llama_eagle`` EAGLE-1 Llama draft (upstream
https://github.com/vllm-project/vllm/blob/v0.32.0/vllm/model_executor/models/llama_eagle.py) and
adds, between ``fc`` and the decoder layer, the PAD-Rec terms of ``padrec_vllm.model.head``::

    u = fc([emb(x_{p+1}); f_p])                               # stock EAGLE-1
    u = u + alpha * item_emb[slot(p + 1, x_{p+1})]            # item position
    u = u + sigmoid(w_g . [u; s_k] + b_g) * s_k, s_k = step_emb[k]   # draft step k

vLLM never tells a draft model its step. The model reads ``draft_index`` (a 0-dim int64 device
tensor: 0 for the pass over verified tokens, then 1..K-1) and uses ``k = draft_index + 1``, capped
at the number of steps the head was trained for. ``padrec_vllm.vllm_plugin.step`` keeps it
current: on the V1 runner it writes the proposer's ``draft_index`` before every draft forward; on
the V2 runner it makes ``draft_index`` the speculator's own ``current_draft_step`` tensor.

The slot of x_{p+1} comes from the head's slot rule (``catalog.tokens.SlotRule``): the token ->
slot table for the per-level format; for the shared format's code tokens, the draft forward's
own ``positions`` argument (the input at position p sits at p + 1; ``padrec_terms.head_slots``,
the function the reference head calls), so no new vLLM patch point is needed. At load the head's
token format is checked against the target's tokenizer (``check_target_vocabulary``): a head
trained for the other format is refused with one error.

Every PAD-Rec setting comes from the head's ``config.json`` (``padrec_*`` fields, see
``padrec_vllm.model.head_checkpoint``); weights keep the checkpoint's names.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.models.llama_eagle import EagleLlamaForCausalLM, LlamaModel
from vllm.model_executor.models.utils import (
    AutoWeightsLoader,
    WeightsMapper,
    maybe_prefix,
    process_eagle_weight,
)

from padrec_vllm.catalog.tokens import SlotRule
from padrec_vllm.model.config import PADREC_ARCHITECTURE
from padrec_vllm.model.padrec_terms import head_slots

SLOT_FIELDS = ("padrec_token_format", "padrec_slot_rule", "padrec_slot_of_token",
               "padrec_slot_period", "padrec_slot_offset")

# checkpoint name -> vLLM name; the stacked q/k/v and gate/up renames are the inner model's
# (``LlamaModel.hf_to_vllm_mapper``); the shared target's ``lm_head`` keeps its name.
CHECKPOINT_TO_VLLM = WeightsMapper(
    orig_to_new_prefix={"fc.": "model.fc.", "layers.": "model.layers.", "padrec.": "model.padrec.",
                        "embed_tokens.": "model.embed_tokens."}
)


class PadRecSettings:
    """The ``padrec_*`` fields of a head's config, validated."""

    def __init__(self, config) -> None:
        def field(name: str):
            if not hasattr(config, name):
                raise ValueError(f"draft config has no {name!r}: not a padrec-vllm head checkpoint")
            return getattr(config, name)

        if field("padrec_kind") != "padrec":
            raise ValueError(f"{PADREC_ARCHITECTURE} needs padrec_kind 'padrec', "
                             f"got {config.padrec_kind!r}")
        self.num_slots = int(field("padrec_num_slots"))
        self.num_steps = int(field("padrec_num_steps"))
        self.use_item_emb = bool(field("padrec_use_item_emb"))
        self.use_step_emb = bool(field("padrec_use_step_emb"))
        self.use_gate = self.use_step_emb and bool(field("padrec_use_gate"))
        raw = {k: getattr(config, k) for k in SLOT_FIELDS if hasattr(config, k)}
        try:
            self.slot_rule = SlotRule.from_config_fields(raw, self.num_slots)
        except ValueError as exc:
            raise ValueError(f"padrec_slot_of_token / slot rule: {exc}") from None
        rule = self.slot_rule
        self.slot_of_token = torch.tensor(rule.table, dtype=torch.long) if rule else None
        if self.use_item_emb:
            if self.slot_of_token is None or self.slot_of_token.shape != (config.vocab_size,):
                raise ValueError(f"padrec_slot_of_token must list a slot for each of the "
                                 f"{config.vocab_size} tokens")

    @property
    def period(self) -> int:
        """The slot period of the position rule; 0 under the token rule."""
        return self.slot_rule.period if self.slot_rule is not None else 0

    @property
    def offset(self) -> int:
        return self.slot_rule.offset if self.slot_rule is not None else 1


def check_target_vocabulary(settings: PadRecSettings, model_config) -> None:
    """Refuse (ValueError) a head whose token format disagrees with the target's tokenizer
    (``model_config.tokenizer``, vLLM's target model config): the vocabulary must be the one the
    head's slot rule describes (``SlotRule.vocabulary_problem``). A head without a slot table
    (no item embedding, written before the shared format) has nothing to check."""
    rule = settings.slot_rule
    if rule is None:
        return
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_config.tokenizer)
    strings = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    problem = rule.vocabulary_problem(strings)
    if problem is not None:
        raise ValueError(f"the PAD-Rec draft head is for the {rule.token_format} token format and "
                         f"does not fit the target's tokenizer ({model_config.tokenizer}): "
                         f"{problem}")


class PadRecTerms(nn.Module):
    """The PAD-Rec terms: parameters named as in the checkpoint (``padrec.*``), the token -> slot
    table and the draft-step source ``draft_index``."""

    def __init__(self, s: PadRecSettings, hidden_size: int) -> None:
        super().__init__()
        self.settings = s
        if s.use_item_emb:
            self.alpha = nn.Parameter(torch.zeros(1))  # [1]
            self.item_emb = nn.Embedding(s.num_slots, hidden_size)  # [num_slots, H]
            self.register_buffer("slot_of_token", s.slot_of_token.clone(), persistent=False)  # [V]
        if s.use_step_emb:
            self.step_emb = nn.Embedding(s.num_steps + 1, hidden_size)  # [K+1, H]; row 0 unused
        if s.use_gate:
            self.gate = nn.Linear(2 * hidden_size, 1)  # w_g [1, 2H], b_g [1]
        # 0 = pass over verified tokens, then 1..K-1 (written or bound by ``step``)
        index = torch.zeros((), dtype=torch.long)  # []
        self.register_buffer("draft_index", index, persistent=False)

    def forward(self, u: torch.Tensor, input_ids: torch.Tensor,
                positions: torch.Tensor) -> torch.Tensor:
        """u [T, H] (the output of ``fc``), input_ids [T] (x_{p+1}), positions [T] (p) -> u [T, H]
        with both terms."""
        s = self.settings
        if s.use_item_emb:
            slots = head_slots(self.slot_of_token, s.period, s.offset, input_ids,
                               positions)  # [T]
            u = u + self.alpha * F.embedding(slots, self.item_emb.weight)  # [T, H]
        if s.use_step_emb:
            k = (self.draft_index + 1).clamp(max=s.num_steps).reshape(1)  # [1]: draft step
            step = F.embedding(k, self.step_emb.weight)  # [1, H]
            if s.use_gate:
                h = u.shape[-1]
                w_u, w_s = self.gate.weight[:, :h], self.gate.weight[:, h:]  # [1, H] each
                logit = F.linear(u, w_u, F.linear(step, w_s, self.gate.bias)[0])  # [T, 1]
                u = torch.addcmul(u, torch.sigmoid(logit), step)  # u + g * s_k, [T, H]
            else:
                u = u + step  # [T, H]
        return u


class PadRecLlamaModel(LlamaModel):
    """vLLM's EAGLE-1 Llama body plus the PAD-Rec terms (compiled like its parent)."""

    def __init__(
        self, *, vllm_config: VllmConfig, prefix: str = "", start_layer_id: int = 0
    ) -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix, start_layer_id=start_layer_id)
        settings = PadRecSettings(self.config)
        check_target_vocabulary(settings, vllm_config.model_config)
        self.padrec = PadRecTerms(settings, self.config.hidden_size)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        hidden_states: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        input_embeds = self.embed_tokens(input_ids)  # [T, H]
        u = self.fc(torch.cat((input_embeds, hidden_states), dim=-1))  # [T, H]
        u = self.padrec(u, input_ids, positions)  # [T, H]
        residual = None
        for layer in self.layers:
            u, residual = layer(positions, u, residual)
        hidden_states = u + residual  # [T, H]
        return hidden_states, hidden_states


class EaglePadRecLlamaForCausalLM(EagleLlamaForCausalLM):
    """PAD-Rec draft head for ``speculative_config={"method": "eagle", "model": HEAD_DIR}``."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        # EagleLlamaForCausalLM.__init__ of vLLM 0.32 with PadRecLlamaModel as the body (calling
        # it would build a stock body first and register its attention layer names twice)
        nn.Module.__init__(self)
        self.config = vllm_config.speculative_config.draft_model_config.hf_config
        if getattr(self.config, "draft_vocab_size", None) is None:
            self.config.draft_vocab_size = self.config.vocab_size
        target_layers = vllm_config.model_config.get_num_layers(vllm_config.parallel_config)
        self.model = PadRecLlamaModel(
            vllm_config=vllm_config,
            prefix=maybe_prefix(prefix, "model"),
            start_layer_id=target_layers,
        )
        self.logits_processor = LogitsProcessor(
            self.config.vocab_size, scale=getattr(self.config, "logit_scale", 1.0)
        )

    @property
    def draft_index(self) -> torch.Tensor:
        """0-dim int64 device tensor: 0 = pass over verified tokens, then 1..K-1."""
        return self.model.padrec.draft_index

    def set_draft_index(self, index: int) -> None:
        """V1 runner: the proposer's ``draft_index`` of the forward that follows."""
        self.model.padrec.draft_index.fill_(index)

    def bind_draft_index(self, counter: torch.Tensor) -> None:
        """V2 runner: read the step from the speculator's ``current_draft_step`` tensor itself."""
        if counter.shape != () or counter.dtype != torch.long:
            raise TypeError(f"draft step counter must be a 0-dim int64 tensor, got "
                            f"{counter.dtype} of shape {tuple(counter.shape)}")
        self.model.padrec.draft_index = counter  # the buffer becomes the speculator's tensor

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def rename(item: tuple[str, torch.Tensor]) -> tuple[str, torch.Tensor]:
            name, tensor = item
            name = CHECKPOINT_TO_VLLM.map_name(name) or name
            process_eagle_weight(self, name)
            return name, tensor

        loaded = AutoWeightsLoader(self).load_weights(map(rename, weights))
        wanted = {f"model.padrec.{n}" for n, _ in self.model.padrec.named_parameters()}
        missing = sorted(wanted - loaded)
        if missing:
            raise ValueError(f"PAD-Rec head checkpoint lacks {missing}")
        return loaded
