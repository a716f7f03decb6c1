"""The exact fallback: per-sample gradients of a module's own parameters by `torch.func`, as Opacus does for
layers it has no formula for.

Used for small layers (LlamaRMSNorm, nn.RMSNorm, GroupNorm, …) and for any trainable layer no other handler
supports. The module's own forward computes the output; each call's inputs and output gradients δ are kept
(in eager mode by tensor hooks on the outputs; when traced by torch.compile, by an identity autograd
Function whose backward records through the `record` op, which the compiler keeps in its graph — this path
needs a single-tensor output and positional tensor inputs, else the eager way is used, at the cost of a
graph break), and afterwards the module is re-run per sample under `vmap` to get
g_i = ∂⟨f(θ; x_i), δ_i⟩/∂θ. This costs one extra forward of that module only, and B × (its parameters)
numbers: fine for norms, expensive for big layers — which is why the engine names those in its log.

With packed sequences (a segment layout: several samples per row) a module can be split by sample only if it
works token by token. Token-wise modules (RMSNorm/LayerNorm variants, or classes added with
`register_tokenwise`) are re-run per *token* under `vmap` and the per-token gradients summed per segment
(N × parameters numbers, N = tokens: like one activation for a norm); on the first such step the per-token
re-run is checked against the batched forward. Any other module refuses a segment layout, naming itself.
"""

from __future__ import annotations

import functools
import re

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .base import CallRecord, PatchedHandler, SketchSink
from ..fsdp import call_without_hooks, full_value
from .record import compiling, record


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def is_norm_layer(module: nn.Module) -> bool:
    """Small normalization layers, for which the exact path is the intended one (not worth a log line)."""
    return "Norm" in type(module).__name__


TOKENWISE_TYPES: list[type] = [nn.RMSNorm, nn.LayerNorm]
# HF's per-model norms (LlamaRMSNorm, GemmaRMSNorm, Qwen2RMSNorm, T5LayerNorm, …) normalize each token alone.
_TOKENWISE_NAME = re.compile(r"(RMS|Layer)Norm")


def register_tokenwise(cls: type[nn.Module]) -> type[nn.Module]:
    """Declare a module class token-wise (each token's output depends on that token's input only), so that the
    exact path can split it by packed segment. Usable as a class decorator."""
    TOKENWISE_TYPES.append(cls)
    return cls


def is_tokenwise(module: nn.Module) -> bool:
    """Whether `module` is known to work token by token (see `register_tokenwise`)."""
    return isinstance(module, tuple(TOKENWISE_TYPES)) or bool(_TOKENWISE_NAME.search(type(module).__name__))


class _RecordOutputGrad(torch.autograd.Function):
    """Identity on a layer's output; its backward records (δ, the layer's inputs) for handler `key`."""

    @staticmethod
    def forward(ctx, key: int, copy: bool, out, *inputs):
        ctx.save_for_backward(*inputs)
        ctx.key, ctx.copy, ctx.n_in = key, copy, len(inputs)
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        record([grad, *ctx.saved_tensors], ctx.key, ctx.copy)
        return (None, None, grad) + (None,) * ctx.n_in


class TappedHandler(PatchedHandler):
    """Runs its module's own forward and keeps each call's inputs and output gradients (see the module
    docstring); subclasses compute per-sample gradients from them in `collect`."""

    def _recorded_forward(self, *args, **kwargs):
        out = self._patch.original(*args, **kwargs)
        tensor_inputs = not kwargs and all(isinstance(a, torch.Tensor) for a in args)
        if compiling() and tensor_inputs and isinstance(out, torch.Tensor) and out.requires_grad:
            return _RecordOutputGrad.apply(self.key, True, out, *args)
        rec = CallRecord()
        if tensor_inputs and isinstance(out, torch.Tensor):  # the usual norm call: no pytree walks (host time)
            rec.tensors["args"], rec.tensors["kwargs"], outs = tuple(a.detach() for a in args), {}, [out]
        else:
            rec.tensors["args"] = tree_map(_detach, args)
            rec.tensors["kwargs"] = tree_map(_detach, kwargs)
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        rec.tensors["deltas"] = [None] * len(outs)
        for j, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(functools.partial(self._delta_arrived, rec, j))
        self.records.append(rec)
        return out

    def _delta_arrived(self, rec: CallRecord, j: int, grad: torch.Tensor) -> None:
        """Output j's gradient δ, from the backward (eager mode: a hook on the output): the record is complete,
        kept for `collect` or reduced at once where the handler can (`reduce_in_backward`)."""
        rec.tensors["deltas"][j] = grad
        rec.done = True
        self._reduce_now(rec)

    def receive(self, tensors):
        rec = CallRecord(tensors={"deltas": [None], "args": tuple(tensors[1:]), "kwargs": {}})
        self._delta_arrived(rec, 0, tensors[0])
        self.records.append(rec)

    def exact_params(self):
        return [p for p in self.module.parameters(recurse=False) if p.requires_grad]


class GenericHandler(TappedHandler):
    """Any module with trainable parameters of its own: exact per-sample gradients via `torch.func.vmap`."""

    kind = "exact"

    def __init__(self, name, module, engine):
        super().__init__(name, module, engine)
        self._tokenwise_verified = False

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters(recurse=False))

    def _what(self) -> str:
        return f"{self.name} ({type(self.module).__name__})"

    def collect(self, sink: SketchSink) -> None:
        layout = sink.layout
        if not layout.is_rows and not is_tokenwise(self.module):
            raise ValueError(
                f"{self._what()} has trainable parameters and no per-token formula: with packed sequences (several "
                "samples per row) its per-sample gradients cannot be split by segment, because it is not known to "
                "work token by token. Train without packing (one sample per row), freeze it, or, if each token's "
                "output depends on that token alone, declare it with "
                "hf_dograph.sketch.layers.generic.register_tokenwise."
            )
        params = {n: p for n, p in self.module.named_parameters(recurse=False) if p.requires_grad}
        # Under FSDP2 the parameters are shards: the whole (small) value, one all-gather each on every rank.
        detached = {n: full_value(p) for n, p in params.items()}
        for rec in self.done_records():
            if layout.is_rows:
                per_sample = self._unit_gradients(rec, detached, layout.batch_size, None)
            else:
                per_token = self._unit_gradients(rec, detached, layout.batch_size, layout.seq_len)
                per_sample = {n: layout.sum_tokens(g.reshape(layout.batch_size, layout.seq_len, -1).float())
                              for n, g in per_token.items()}
            for n, p in params.items():
                sink.add_exact(p, per_sample[n])

    def _unit_gradients(self, rec, detached: dict, batch: int, seq: int | None) -> dict:
        """{name: (U, *shape)}: gradients of ⟨f(θ; x_u), δ_u⟩ per unit u — per row (seq None) or per token (rows
        and tokens of (batch, seq) flattened)."""
        from torch.func import grad, vmap

        module = self.module
        leaves, spec = tree_flatten((rec.tensors["args"], rec.tensors["kwargs"]))
        lead = (batch,) if seq is None else (batch, seq)
        units = batch if seq is None else batch * seq
        # Inputs shaped like the units are split; anything else is shared.
        uidx = [i for i, x in enumerate(leaves)
                if isinstance(x, torch.Tensor) and x.dim() >= len(lead) and tuple(x.shape[:len(lead)]) == lead]
        deltas = rec.tensors["deltas"]
        dj = [j for j, d in enumerate(deltas) if d is not None]
        for j in dj:
            if deltas[j].dim() < len(lead) or tuple(deltas[j].shape[:len(lead)]) != lead:
                raise ValueError(
                    f"{self._what()}: output {j} has shape {tuple(deltas[j].shape)}, not "
                    + (f"batch-first with batch size {batch}" if seq is None else
                       f"token-aligned with the packed batch (B, T) = {lead}")
                )

        def unit(x):  # one unit as a batch of one: (1, …) per row, (1, 1, …) per token
            return x.reshape(units, *([1] * (len(lead) - 1)), *x.shape[len(lead):])

        def weighted_output(pd, xs, ds):
            new = list(leaves)
            for i, x in zip(uidx, xs):
                new[i] = x.unsqueeze(0)
            args, kwargs = tree_unflatten(new, spec)
            out = call_without_hooks(module, pd, tuple(args), kwargs)
            outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            total = 0.0
            for j, d in zip(dj, ds):
                total = total + (outs[j] * d.unsqueeze(0)).sum()
            return total

        xs = tuple(unit(leaves[i]) for i in uidx)
        ds = tuple(unit(deltas[j]) for j in dj)
        if seq is not None and not self._tokenwise_verified:
            self._verify_tokenwise(leaves, spec, uidx, xs, detached, lead)
        return vmap(grad(weighted_output), in_dims=(None, 0, 0))(detached, xs, ds)

    def _verify_tokenwise(self, leaves, spec, uidx, xs, detached, lead) -> None:
        """First packed step: the module run token by token must give its batched output."""
        from torch.func import vmap

        module = self.module
        args, kwargs = tree_unflatten(list(leaves), spec)
        with torch.no_grad():
            full = [t for t in tree_flatten(call_without_hooks(module, detached, tuple(args), kwargs))[0]
                    if isinstance(t, torch.Tensor)]

            def one(xs_u):
                new = list(leaves)
                for i, x in zip(uidx, xs_u):
                    new[i] = x.unsqueeze(0)
                a, k = tree_unflatten(new, spec)
                return tuple(t for t in tree_flatten(call_without_hooks(module, detached, tuple(a), k))[0]
                             if isinstance(t, torch.Tensor))

            per_token = vmap(one)(xs)
        for f, p in zip(full, per_token):
            f = f.float()
            p = p.float().reshape(f.shape) if p.numel() == f.numel() else None
            if p is None or not torch.allclose(p, f, rtol=1e-4, atol=1e-5 * (float(f.abs().max()) + 1e-12)):
                raise ValueError(
                    f"{self._what()} is declared token-wise but its output for a token depends on other tokens: "
                    "with packed sequences its per-sample gradients cannot be split by segment. Train without "
                    "packing (one sample per row), or freeze it."
                )
        self._tokenwise_verified = True
