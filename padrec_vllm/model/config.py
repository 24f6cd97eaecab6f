"""Names and shapes of the draft heads, defined once (no torch import: the CLI and the server read
these without loading a model).

- ``HEAD_KINDS``: the two head bodies, ``eagle`` (EAGLE-1) and ``padrec`` (EAGLE-1 plus the
  PAD-Rec terms, ``model.head``).
- ``HEAD_VARIANTS``: the trainable variants by name: the two kinds and the three PAD-Rec ablations.
- ``ARCHITECTURES``: kind -> the ``architectures`` entry of a head checkpoint's ``config.json``,
  the name vLLM loads it by (``PADREC_ARCHITECTURE`` is registered by our vLLM plugin).
- ``MAX_DRAFT_TOKENS``: the most draft tokens a round may propose (server settings and metrics).
- ``HeadConfig``: the shape of one head.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

HEAD_KINDS = ("eagle", "padrec")
PADREC_ARCHITECTURE = "EaglePadRecLlamaForCausalLM"
# vLLM's registry name of its stock EAGLE-1 Llama draft, and ours for the PAD-Rec head
ARCHITECTURES = MappingProxyType(
    {"eagle": "EagleLlamaForCausalLM", "padrec": PADREC_ARCHITECTURE}
)
MAX_DRAFT_TOKENS = 16


@dataclass(frozen=True)
class HeadVariant:
    """A trainable head: its kind and the PAD-Rec ablation switches (ignored for eagle)."""

    kind: str
    use_item_emb: bool = True
    use_step_emb: bool = True
    use_gate: bool = True

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")

    def switches(self) -> dict[str, bool]:
        """The ablation switches as ``HeadConfig`` keyword arguments."""
        return {"use_item_emb": self.use_item_emb, "use_step_emb": self.use_step_emb,
                "use_gate": self.use_gate}


# the two heads and the three ablations, by the name the CLI and the artifacts use
HEAD_VARIANTS = MappingProxyType({
    "eagle": HeadVariant("eagle"),
    "padrec": HeadVariant("padrec"),
    "padrec-no-item": HeadVariant("padrec", use_item_emb=False),
    "padrec-no-step": HeadVariant("padrec", use_step_emb=False),
    "padrec-no-gate": HeadVariant("padrec", use_gate=False),
})


@dataclass(frozen=True)
class HeadConfig:
    """Shape of a draft head. The Llama fields are the target's (the head lives in its space)."""

    kind: str  # one of HEAD_KINDS
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    vocab_size: int
    num_slots: int  # item slots (TokenLayout.num_slots)
    num_steps: int  # K: draft steps the head is trained for
    use_item_emb: bool = True  # padrec only
    use_step_emb: bool = True  # padrec only
    use_gate: bool = True  # padrec only
    initializer_range: float = 0.02
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in HEAD_KINDS:
            raise ValueError(f"head kind must be one of {HEAD_KINDS}, got {self.kind!r}")
        if self.num_steps < 1 or self.num_slots < 1:
            raise ValueError("num_steps and num_slots must be >= 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @property
    def has_item_emb(self) -> bool:
        return self.kind == "padrec" and self.use_item_emb

    @property
    def has_step_emb(self) -> bool:
        return self.kind == "padrec" and self.use_step_emb

    @property
    def has_gate(self) -> bool:
        return self.has_step_emb and self.use_gate

    def step_row(self, step: int) -> int:
        """The step-embedding row of draft step ``step`` (>= 1): steps beyond ``num_steps`` reuse
        the last one, so a head trained for K steps can draft more tokens."""
        if step < 1:
            raise ValueError(f"draft step must be >= 1, got {step}")
        return min(step, self.num_steps)

    @classmethod
    def from_target(
        cls,
        config,
        kind: str,
        *,
        num_slots: int,
        num_steps: int,
        use_item_emb: bool = True,
        use_step_emb: bool = True,
        use_gate: bool = True,
    ) -> HeadConfig:
        """Head config from the target's ``LlamaConfig`` (transformers 4.x or 5.x field layout)."""
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        rope = dict(rope or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"the draft head supports default RoPE only, target has {rope_type!r}")
        theta = rope.get("rope_theta", getattr(config, "rope_theta", None))
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"draft head needs a SiLU MLP, target has {config.hidden_act!r}")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ValueError("draft head supports targets without attention/MLP biases only")
        num_heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        return cls(
            kind=kind,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=getattr(config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=config.rms_norm_eps,
            rope_theta=float(theta if theta is not None else 10000.0),
            max_position_embeddings=config.max_position_embeddings,
            vocab_size=config.vocab_size,
            num_slots=num_slots,
            num_steps=num_steps,
            use_item_emb=use_item_emb,
            use_step_emb=use_step_emb,
            use_gate=use_gate,
            initializer_range=getattr(config, "initializer_range", 0.02),
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_id=getattr(config, "eos_token_id", None),
            pad_token_id=getattr(config, "pad_token_id", None),
        )
