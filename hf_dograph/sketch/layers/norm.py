"""`nn.LayerNorm`: exact per-sample gradients in closed form (small: 2 × hidden numbers per sample).

y = x̂ ⊙ w + b with x̂ = (x − μ)/σ per token, so g_i(w) = Σ_t δ_{i,t} ⊙ x̂_{i,t} and g_i(b) = Σ_t δ_{i,t}.
x̂ is recomputed from the kept input (one cheap normalization) instead of re-running autograd per sample.
Other norms (RMSNorm variants) take the generic `torch.func` path, which is exact for any formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import register_layer
from .base import SketchSink
from .generic import HookedHandler


@register_layer
class LayerNormHandler(HookedHandler):
    kind = "layernorm"

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return (isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward
                and module.elementwise_affine)

    def collect(self, sink: SketchSink) -> None:
        m = self.module
        shape = tuple(m.normalized_shape)
        numel = 1
        for s in shape:
            numel *= s
        for rec in self.done_records():
            x = rec.tensors["args"][0] if rec.tensors["args"] else rec.tensors["kwargs"]["input"]
            d = rec.tensors["deltas"][0]
            if d is None:
                continue
            if x.shape[0] != sink.batch:
                raise ValueError(f"{self.name} (LayerNorm): input of shape {tuple(x.shape)} is not batch-first "
                                 f"with batch size {sink.batch}")
            d = d.float().reshape(sink.batch, -1, numel)
            if m.weight is not None and m.weight.requires_grad:
                xhat = F.layer_norm(x.float(), shape, None, None, m.eps).reshape(sink.batch, -1, numel)
                sink.add_exact(m.weight, (d * xhat).sum(dim=1))
            if m.bias is not None and m.bias.requires_grad:
                sink.add_exact(m.bias, d.sum(dim=1))
