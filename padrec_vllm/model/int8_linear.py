"""Int8 draft heads for CPU decoding.

A CPU draft step is bound by reading the head's weights: about 8 MB of float32 at the bench
preset, which no longer sit in cache after the target's verify forward has streamed its own. With
int8 weights (symmetric, one scale per output channel) and activations quantized on the fly
(``torch.ops.quantized.linear_dynamic``, fbgemm), the same layers read a quarter of the bytes.
Only the draft changes: the target still verifies every draft in its own precision, so the
output stays the target's greedy output; the head's acceptance may move slightly. Measured
(docs/RESULTS.md): at bench width decoding is 5-9% faster than with the float head; at demo width
(hidden 128, a head that sits in cache) it is slower, since quantizing activations costs more
than the smaller reads save.

``quantize_head(head, target)`` returns an inference-only copy of a ``DraftHead`` whose decoder
layer linears are ``Int8Linear``, whose logits go through an int8 copy of the target's
``lm_head``, and whose input projection is the CPU decoding fold (``heads.DraftHead._decode_tables``:
``fc`` and the PAD-Rec terms as per-token tables plus one feature matrix) with that matrix in
int8. The copy's parameters must not change afterwards: the int8 matrices are not recomputed.
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

from padrec_vllm.model.heads import DraftHead


class Int8Linear(nn.Module):
    """Inference-only ``nn.Linear`` with int8 per-output-channel weights, CPU only.

    forward: x [..., in] float32 -> [..., out] float32, the activations quantized per call.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        w = linear.weight.detach().float().cpu()  # [out, in]
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)  # [out]
        zero = torch.zeros(w.shape[0], dtype=torch.long)  # [out]
        bias = linear.bias.detach().float().cpu() if linear.bias is not None else None
        with warnings.catch_warnings():  # quantized tensor creation warns of a future deprecation
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(w, scale.double(), zero, 0, torch.qint8)
        try:
            self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        except RuntimeError as e:
            raise ValueError(f"this PyTorch build cannot run int8 linears on CPU ({e})") from e
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError("Int8Linear runs on CPU only")
        flat = x.reshape(-1, self.in_features).float()  # [N, in]
        out = torch.ops.quantized.linear_dynamic(flat, self._packed)  # [N, out]
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def quantize_head(head: DraftHead, target: nn.Module) -> DraftHead:
    """An int8 copy of ``head`` for CPU drafting with ``target`` (module docstring); ``head`` is
    left as it is.

    Raises ValueError for a head that is not float32 on CPU (the int8 kernels are CPU-only and
    read float32 activations).
    """
    p = head.fc.weight
    if p.device.type != "cpu" or p.dtype != torch.float32:
        raise ValueError(f"int8 drafting needs a float32 head on CPU, got {p.dtype} on {p.device}")
    q = copy.deepcopy(head).eval()
    for layer in q.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name, child in list(parent.named_children()):
                if isinstance(child, nn.Linear):
                    setattr(parent, name, Int8Linear(child))
    q.draft_lm_head = Int8Linear(target.lm_head)
    with torch.inference_mode():
        tables = q._decode_tables(target.get_input_embeddings())
    if tables is not None:  # the fold's feature matrix features_t [H, H'] as a linear H -> H'
        fold = nn.Linear(*tables.features_t.shape, bias=False)
        fold.weight.data = tables.features_t.t().contiguous()  # [H', H]
        q.draft_feature_proj = Int8Linear(fold)
    return q
