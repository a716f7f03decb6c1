"""The exact fallback: per-sample gradients of a module's own parameters by `torch.func`, as Opacus does for
layers it has no formula for.

Used for small layers (LlamaRMSNorm, nn.RMSNorm, GroupNorm, …) and for any trainable layer no other handler
supports. The module's forward is left alone: a forward hook keeps each call's inputs, tensor hooks on its
outputs keep the output gradients δ, and afterwards the module is re-run per sample under `vmap` to get
g_i = ∂⟨f(θ; x_i), δ_i⟩/∂θ. This costs one extra forward of that module only, and B × (its parameters)
numbers: fine for norms, expensive for big layers — which is why the engine names those in its log.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from .base import CallRecord, LayerHandler, SketchSink


def _detach(x):
    return x.detach() if isinstance(x, torch.Tensor) else x


def _store_delta(rec: CallRecord, j: int, grad: torch.Tensor) -> None:
    rec.tensors["deltas"][j] = grad
    rec.done = True


def is_norm_layer(module: nn.Module) -> bool:
    """Small normalization layers, for which the exact path is the intended one (not worth a log line)."""
    return "Norm" in type(module).__name__


class HookedHandler(LayerHandler):
    """Captures each call's inputs (forward hook) and output gradients (tensor hooks); forward unchanged."""

    def __init__(self, name, module, engine):
        super().__init__(name, module, engine)
        self._handle = None

    def install(self):
        if self._handle is None:
            self._handle = self.module.register_forward_hook(self._hook, with_kwargs=True)

    def remove(self):
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, args, kwargs, output):
        eng = self.engine
        if not eng.recording or eng.replaying or not torch.is_grad_enabled():
            return None
        rec = CallRecord()
        rec.tensors["args"] = tree_map(_detach, args)
        rec.tensors["kwargs"] = tree_map(_detach, kwargs)
        outs = [t for t in tree_flatten(output)[0] if isinstance(t, torch.Tensor)]
        rec.tensors["deltas"] = [None] * len(outs)
        for j, t in enumerate(outs):
            if t.requires_grad:
                t.register_hook(functools.partial(_store_delta, rec, j))
        self.records.append(rec)
        return None

    def exact_params(self):
        return [p for p in self.module.parameters(recurse=False) if p.requires_grad]


class GenericHandler(HookedHandler):
    """Any module with trainable parameters of its own: exact per-sample gradients via `torch.func.vmap`."""

    kind = "exact"

    @classmethod
    def supports(cls, module: nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters(recurse=False))

    def collect(self, sink: SketchSink) -> None:
        from torch.func import functional_call, grad, vmap

        batch = sink.batch
        params = {n: p for n, p in self.module.named_parameters(recurse=False) if p.requires_grad}
        detached = {n: p.detach() for n, p in params.items()}
        module = self.module
        for rec in self.done_records():
            leaves, spec = tree_flatten((rec.tensors["args"], rec.tensors["kwargs"]))
            # Inputs with the batch as first dimension are split per sample; anything else is shared.
            bidx = [i for i, x in enumerate(leaves)
                    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch]
            deltas = rec.tensors["deltas"]
            dj = [j for j, d in enumerate(deltas) if d is not None]
            for j in dj:
                if deltas[j].dim() == 0 or deltas[j].shape[0] != batch:
                    raise ValueError(
                        f"{self.name} ({type(module).__name__}): output {j} has shape {tuple(deltas[j].shape)}, "
                        f"not batch-first with batch size {batch}"
                    )

            def weighted_output(pd, xs, ds, leaves=leaves, spec=spec, bidx=bidx, dj=dj):
                new = list(leaves)
                for i, x in zip(bidx, xs):
                    new[i] = x.unsqueeze(0)
                args, kwargs = tree_unflatten(new, spec)
                out = functional_call(module, pd, tuple(args), kwargs)
                outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
                total = 0.0
                for j, d in zip(dj, ds):
                    total = total + (outs[j] * d.unsqueeze(0)).sum()
                return total

            xs = tuple(leaves[i] for i in bidx)
            ds = tuple(deltas[j] for j in dj)
            per_sample = vmap(grad(weighted_output), in_dims=(None, 0, 0))(detached, xs, ds)
            for n, p in params.items():
                sink.add_exact(p, per_sample[n])
