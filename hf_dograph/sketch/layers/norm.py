"""`nn.LayerNorm`: exact per-sample gradients in closed form (small: 2 × hidden numbers per sample).

y = x̂ ⊙ w + b with x̂ = (x − μ)/σ per token, so g_s(w) = Σ_{t∈s} δ_t ⊙ x̂_t and g_s(b) = Σ_{t∈s} δ_t.
x̂ is recomputed from the kept input (one cheap normalization) instead of re-running autograd per sample.
Other norms (RMSNorm variants) take the generic `torch.func` path, which is exact for any formula (per token,
then summed per sample, when samples are packed segments).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from .registry import register_layer
from .base import SketchSink
from .generic import TappedHandler


@register_layer
class LayerNormHandler(TappedHandler):
    kind = "layernorm"

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return (isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward
                and module.elementwise_affine)

    def collect(self, sink: SketchSink) -> None:
        m = self.module
        layout = sink.layout
        shape = tuple(m.normalized_shape)
        numel = 1
        for s in shape:
            numel *= s
        what = f"{self.name} (LayerNorm)"
        for rec in self.done_records():
            x = rec.tensors["args"][0] if rec.tensors["args"] else rec.tensors["kwargs"]["input"]
            d = rec.tensors["deltas"][0]
            if d is None:
                continue
            d = layout.token_view(d.float(), numel, what)
            if m.weight is not None and m.weight.requires_grad:
                xhat = layout.token_view(F.layer_norm(x.float(), shape, None, None, m.eps), numel, what)
                sink.add_exact(m.weight, layout.sum_tokens(d * xhat))
            if m.bias is not None and m.bias.requires_grad:
                sink.add_exact(m.bias, layout.sum_tokens(d))
