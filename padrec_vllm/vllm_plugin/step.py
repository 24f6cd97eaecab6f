"""The draft step for the PAD-Rec head inside vLLM 0.32: one narrow hook per model runner.

vLLM does not pass a draft model its step, so each hook feeds the head's ``draft_index``
(0 = the pass over verified tokens, then 1..K-1; the head uses step ``k = draft_index + 1``):

- V1 runner (CPU, and GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``): ``EagleProposer.propose`` calls
  ``build_per_group_and_layer_attn_metadata(common_attn_metadata, draft_index)`` right before
  every draft forward (0 first, then ``token_index + 1``). The hook, set on ``EagleProposer``
  only, writes ``draft_index`` into the head's buffer, then runs vLLM's method unchanged.
- V2 runner (GPU default): ``TargetDependentARSpeculator`` owns ``current_draft_step``, a 0-dim
  int64 device tensor that its kernels set to 0 before the draft prefill and ``fill_(step)`` before
  decode step ``step`` (also inside captured CUDA graphs). The hook, set on
  ``EagleSpeculator.load_model``, hands that tensor to the head, which then reads it directly.

Both hooks act only when the draft model is a PAD-Rec head; any other model, speculative or not,
runs vLLM's code as before. ``install`` fails with ``PatchError`` naming the symbol if vLLM lacks
one it patches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from padrec_vllm.vllm_plugin.patching import PatchError, install_hook

# (module, class, attribute) of every vLLM symbol the hooks rely on
V1_PROPOSER = (
    "vllm.v1.spec_decode.eagle", "EagleProposer", "build_per_group_and_layer_attn_metadata"
)
V2_SPECULATOR = ("vllm.v1.worker.gpu.spec_decode.eagle.speculator", "EagleSpeculator", "load_model")
V2_COUNTER = "current_draft_step"


def padrec_head(model) -> torch.nn.Module | None:
    """The PAD-Rec head inside ``model`` (through vLLM's CUDA-graph wrappers), else None."""
    for _ in range(4):
        if hasattr(model, "set_draft_index") and hasattr(model, "bind_draft_index"):
            return model
        unwrap = getattr(model, "unwrap", None)
        if unwrap is None:
            return None
        model = unwrap()
    return None


def _v1_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def build_per_group_and_layer_attn_metadata(self, common_attn_metadata, draft_index: int = 0):
        head = padrec_head(getattr(self, "model", None))
        if head is not None:
            head.set_draft_index(draft_index)
        return original(self, common_attn_metadata, draft_index=draft_index)

    return build_per_group_and_layer_attn_metadata


def _v2_hook(original: Callable) -> Callable:
    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        head = padrec_head(getattr(self, "model", None))
        if head is not None:
            counter = getattr(self, V2_COUNTER, None)
            if not isinstance(counter, torch.Tensor):
                raise PatchError(f"PAD-Rec vLLM plugin: {type(self).__name__}.{V2_COUNTER} not "
                                 "found after load_model; this plugin targets vLLM 0.32.0")
            head.bind_draft_index(counter)
        return out

    return load_model


def install() -> None:
    """Set both hooks (idempotent). Raises PatchError naming any missing vLLM symbol."""
    install_hook(V1_PROPOSER, _v1_hook, ("self", "common_attn_metadata", "draft_index"))
    install_hook(V2_SPECULATOR, _v2_hook, ("self", "target_model"))
