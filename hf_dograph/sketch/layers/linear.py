"""Linear maps (`nn.Linear`, HF `Conv1D`): factored sketches from the output gradients and inputs, with the
weight gradient deferred until α is known.

While capturing, the module's forward runs through `_DeferredLinear`, whose forward is the ordinary op and
whose backward returns the input gradient δ·W only: autograd never forms dW (the costly half of a linear
layer's backward). The backward keeps δ (the gradient at the output) and the saved input a. Then

* sketch:   S_s = Σ_{t∈s} (P_o δ_t)(P_n a_t)ᵀ          (METHOD.md, "factored sketch")
* bias:     g_s = Σ_{t∈s} δ_t, exact, small
* weighted: dW += Σ_s c_s Σ_{t∈s} δ_t a_tᵀ = δᵀ (c ⊙ a)  — one matmul, the same cost as the dW that
  the plain backward would have computed (c per token: its sample's coefficient).

A narrow layer over long samples (out·in ≤ ½·T·(out + in) with the engine's default `form_below` = ½, e.g.
every layer of GPT-2 2×64 at T = 128) instead forms G_s = Σ_{t∈s} δ_t a_tᵀ for all samples in one batched
matmul as soon as its backward has run (δ and a are then not kept), sketches it as P_o G_s P_nᵀ (the same
S_s) and forms dW += Σ_s c_s G_s from it: fewer flops and less memory there (`LinearHandler.forms_per_sample`).

t ∈ s: the tokens of sample s — a row of the batch, or a packed segment (`SampleLayout`).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from .registry import register_layer
from .base import (
    CallRecord,
    DeferredHandler,
    SketchSink,
    autocast_dtype,
    cast,
    weighted_sum,
)
from ...tensors import as_dtype, as_float
from .record import compiling, record

try:  # HF's GPT-2 style "Conv1D": y = x @ W + b with W stored (in, out)
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover - transformers is a dependency, but keep the engine importable
    Conv1D = None


class _DeferredLinear(torch.autograd.Function):
    """y = x Wᵀ + b (or x W + b for Conv1D); backward gives the input gradient only and records (δ, a)."""

    @staticmethod
    def forward(ctx, x, weight, bias, key: int, transposed: bool, keep_input: bool, copy: bool):
        # Autocast is honoured by hand, the way it treats linear/addmm: inputs cast to its dtype. The casts
        # are made here (not by autocast inside) so that the tensors saved for backward are known.
        dt = autocast_dtype(x.device.type)
        # (autocast off inside; when it is not on, there is nothing to switch off)
        with torch.autocast(x.device.type, enabled=False) if dt is not None else contextlib.nullcontext():
            xc, wc, bc = cast(x, dt), cast(weight, dt), cast(bias, dt)
            if transposed:
                flat = xc.reshape(-1, xc.shape[-1])
                y = torch.addmm(bc, flat, wc) if bc is not None else flat @ wc
                y = y.view(*xc.shape[:-1], wc.shape[1])
            else:
                y = F.linear(xc, wc, bc)
        if keep_input:
            ctx.save_for_backward(wc, xc)
        else:
            ctx.save_for_backward(wc)
        ctx.key, ctx.copy, ctx.transposed, ctx.x_dtype = key, copy, transposed, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        saved = ctx.saved_tensors
        wc = saved[0]
        gx = None
        if ctx.needs_input_grad[0]:
            gx = (gy @ (wc.T if ctx.transposed else wc)).to(ctx.x_dtype)
        # The input is read here, not at forward time: activation checkpointing may have recomputed it.
        record([gy, *saved[1:]], ctx.key, ctx.copy)
        return gx, None, None, None, None, None, None


def _is_plain(module: nn.Module, cls: type) -> bool:
    # A subclass that overrides forward may compute something else: leave it to the exact fallback.
    return isinstance(module, cls) and type(module).forward is cls.forward


@register_layer
class LinearHandler(DeferredHandler):
    """`nn.Linear` (weight (out, in)) and HF `Conv1D` (weight (in, out))."""

    kind = "linear"

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return _is_plain(module, nn.Linear) or (Conv1D is not None and _is_plain(module, Conv1D))

    def __init__(self, name, module, engine):
        super().__init__(name, module, engine)
        self.transposed = not isinstance(module, nn.Linear)
        w, b = module.weight, module.bias
        self.weight = w if w.requires_grad else None
        self.bias = b if b is not None and b.requires_grad else None
        self.in_features, self.out_features = (w.shape[0], w.shape[1]) if self.transposed else (w.shape[1], w.shape[0])

    def factored_params(self):
        return [self.weight] if self.weight is not None else []

    def exact_params(self):
        return [self.bias] if self.bias is not None else []

    def deferred_params(self):
        return self.factored_params() + self.exact_params()

    def _deferred_forward(self, input):
        m = self.module
        return _DeferredLinear.apply(input, m.weight, m.bias, self.key, self.transposed, self.weight is not None,
                                     compiling())

    def receive(self, tensors):
        rec = CallRecord(tensors={"delta": tensors[0]}, done=True)
        if len(tensors) > 1:
            rec.tensors["input"] = tensors[1]
        self._reduce_now(rec)
        self.records.append(rec)

    def reduce_in_backward(self, rec: CallRecord, layout) -> dict | None:
        """In the backward, right after this layer's: if it is narrow for its samples (`forms_per_sample`), its
        per-sample gradients G (S, rows, cols) and its bias's per-sample sums replace δ and a in the record, so
        that δ and a are never kept (autograd frees a as it would for the plain step)."""
        if self.weight is None or "input" not in rec.tensors:
            return None
        d, a = self._rows(rec, layout)
        if not self.forms_per_sample(d.shape[1] if layout.is_rows else layout.padded_length()):
            return None
        left, right = (a, d) if self.transposed else (d, a)  # the parameter's layout, as in `collect`
        # G_s = Σ_{t∈s} left_t right_tᵀ for every sample at once: one batched matmul, the plain dW's flops
        g = as_float(torch.bmm(layout.padded(left).transpose(1, 2), layout.padded(as_dtype(right, left.dtype))))
        bias = layout.sum_tokens(as_float(d)) if self.bias is not None else None
        return {"per_sample": g, "bias": bias}

    # ------------------------------------------------------------------ after the backward
    def _rows(self, rec: CallRecord, layout):
        what = f"{self.name} ({type(self.module).__name__})"
        d = layout.token_view(rec.tensors["delta"], self.out_features, what)
        a = rec.tensors.get("input")
        a = layout.token_view(a, self.in_features, what) if a is not None else None
        return d, a

    def forms_per_sample(self, tokens: int) -> bool:
        """Whether this micro-batch forms each sample's weight gradient G_s (rows × cols) outright rather than
        sketching it from its tokens' projections, given `tokens` per sample (T, or the longest packed segment):
        rows·cols ≤ `form_below` · T·(rows + cols), the engine's setting (default 1/2).

        Both give the same sketch P_r G_s P_cᵀ and the same weighted gradient (up to float rounding), so the
        choice is free per micro-batch and made on cost. Formed (in the backward): a batched matmul with the
        plain dW's flops, then ≈ 2·S·rows·cols·f to sketch G and one pass over it for the weighted sum; G
        (S × rows × cols) is kept instead of δ and a (S × T × (rows + cols)). Token path: ≈ 2·S·T·(rows + cols)·f
        for the projections, and the weighted sum's matmul (the dW's flops) later. The flops are equal at
        rows·cols = T·(rows + cols), but G is written once and read twice more: on CPU forming pays at half
        that and costs more near the break-even point (`benchmarks/factor_dim_sweep.py --form-below`,
        BENCHMARKS.md "Step cost"). Every layer of GPT-2 2×64 at T = 128 forms; GPT-2 small's 768-wide layers
        at T = 512 do not."""
        rows, cols = self.weight.shape
        return rows * cols <= self.engine.form_below * tokens * (rows + cols)

    def collect(self, sink: SketchSink) -> None:
        layout = sink.layout
        for rec in self.done_records():
            per_sample = rec.tensors.get("per_sample")
            if per_sample is not None:  # formed in the backward: its sketch P_r G P_cᵀ is the token path's below
                if rec.tensors["bias"] is not None:
                    sink.add_exact(self.bias, rec.tensors["bias"])
                sink.add_factored(self.weight, self.engine.slot(self.weight).sketch(per_sample))
                continue
            d, a = self._rows(rec, layout)
            if self.weight is not None:
                slot = self.engine.slot(self.weight)
                # The slot is laid out like the parameter: rows = out for Linear, in for Conv1D.
                left, right = (a, d) if self.transposed else (d, a)
                # Project first (f columns), then gather each sample's tokens: the copy is f wide.
                u = layout.padded(as_float(slot.project(left, 0)))
                v = layout.padded(as_float(slot.project(as_dtype(right, left.dtype), 1)))
                sink.add_factored(self.weight, torch.bmm(u.transpose(1, 2), v))
            if self.bias is not None:
                sink.add_exact(self.bias, layout.sum_tokens(as_float(d)))

    def accumulate(self, coef: torch.Tensor, bad: torch.Tensor | None, layout) -> None:
        if self.weight is None:
            return
        for rec in self.done_records():
            per_sample = rec.tensors.get("per_sample")
            if per_sample is not None:
                self._accumulate_formed(per_sample, coef, bad)
                continue
            d, a = self._rows(rec, layout)
            with self.engine.small_ops(d.device):
                a = as_dtype(a, d.dtype)
                # Scale whichever side is narrower: the temporary is then the smaller of the two. The other
                # side gets exact zeros where the scaled one does (0 · NaN would be NaN); δ is the engine's
                # own tensor, so in place.
                if a.shape[-1] <= d.shape[-1]:
                    a, d = layout.scale_tokens(a, coef, bad), layout.zero_tokens(d, bad, in_place=True)
                else:
                    d, a = layout.scale_tokens(d, coef, bad), layout.zero_tokens(a, bad, in_place=False)
            d2, a2 = d.reshape(-1, d.shape[-1]), a.reshape(-1, a.shape[-1])
            left, right = (a2.T, d2) if self.transposed else (d2.T, a2)
            g = self.engine.grad_target(self.weight)  # .grad, or under FSDP2 a full-size buffer (see fsdp.py)
            if g is not None and g.dtype == left.dtype and g.is_contiguous():
                g.addmm_(left, right)  # in place: no (out × in) temporary
            else:
                self.engine.add_grad(self.weight, left @ right)

    def _accumulate_formed(self, per_sample: torch.Tensor, coef: torch.Tensor, bad: torch.Tensor | None) -> None:
        """weight.grad += Σ_s coef_s G_s from the per-sample gradients formed in the backward (S, rows, cols)."""
        total = weighted_sum(per_sample.reshape(per_sample.shape[0], -1), coef, bad)
        self.engine.add_grad(self.weight, total.view(self.weight.shape))
