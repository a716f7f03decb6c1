"""`nn.LayerNorm`: exact per-sample gradients in closed form (small: 2 × hidden numbers per sample).

y = x̂ ⊙ w + b with x̂ = (x − μ)/σ per token, so g_s(w) = Σ_{t∈s} δ_t ⊙ x̂_t and g_s(b) = Σ_{t∈s} δ_t.
x̂ is recomputed from the input (one cheap normalization) instead of re-running autograd per sample.

The sums are taken in the backward, as soon as the layer's δ arrives (`reduce_in_backward`; the engine says
which samples the backward's tokens belong to): the record then holds two (S, hidden) sums instead of δ and
x (B × T × hidden each), which autograd frees layer by layer as it does for the plain step. Where the tensors
are not token-aligned, δ and x are kept and `collect` names the problem.

Other norms (RMSNorm variants) take the generic `torch.func` path, which is exact for any formula (per token,
then summed per sample, when samples are packed segments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...tensors import as_float
from .registry import register_layer
from .base import CallRecord, SketchSink
from .generic import TappedHandler


@register_layer
class LayerNormHandler(TappedHandler):
    kind = "layernorm"

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return (isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward
                and module.elementwise_affine)

    def reduce_in_backward(self, rec: CallRecord, layout) -> dict:
        with self.engine.small_ops(rec.tensors["deltas"][0].device):
            return {"sums": self._per_sample_sums(rec, layout)}

    def _per_sample_sums(self, rec: CallRecord, layout) -> dict[str, torch.Tensor] | None:
        """{'weight': Σ_t δ_t ⊙ x̂_t, 'bias': Σ_t δ_t} per sample (S, hidden), for the trainable ones."""
        m = self.module
        d = rec.tensors["deltas"][0]
        if d is None:
            return None
        x = rec.tensors["args"][0] if rec.tensors["args"] else rec.tensors["kwargs"]["input"]
        shape = tuple(m.normalized_shape)
        numel = 1
        for s in shape:
            numel *= s
        what = f"{self.name} (LayerNorm)"
        d = layout.token_view(as_float(d), numel, what)
        sums = {}
        if m.weight is not None and m.weight.requires_grad:
            xhat = layout.token_view(F.layer_norm(as_float(x), shape, None, None, m.eps), numel, what)
            sums["weight"] = layout.sum_tokens(d * xhat)
        if m.bias is not None and m.bias.requires_grad:
            sums["bias"] = layout.sum_tokens(d)
        return sums

    def collect(self, sink: SketchSink) -> None:
        for rec in self.done_records():
            sums = rec.tensors["sums"] if "sums" in rec.tensors else self._per_sample_sums(rec, sink.layout)
            for name, g in (sums or {}).items():
                sink.add_exact(getattr(self.module, name), g)
