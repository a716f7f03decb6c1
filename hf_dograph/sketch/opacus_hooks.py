"""Opacus' `GradSampleHooks`, adjusted for what the reference engine must get exactly right.

* **Embeddings with a padding_idx.** Autograd gives the padding row no gradient *from the embedding*; Opacus'
  embedding sampler ignores padding_idx. The row must be zeroed in the embedding's own contribution, before
  Opacus adds it to other uses of the same weight: with a tied `lm_head` (Opacus 1.6 sums a tied weight's
  contributions into one `grad_sample`) the head's gradient on that row is real.
* **Scaled embeddings** (Gemma's `GemmaTextScaledWordEmbedding` and the like: embedding × constant c, see
  `scaled_embedding`): Opacus finds samplers by exact type, so it would send the subclass to its functorch
  path, which refuses any layer with buffers. They get the embedding sampler with δ scaled by c.
* **Other layers with constant buffers** and no Opacus sampler: exact per-sample gradients by `torch.func`
  with the module's own buffers (Opacus' functorch path copies the module to the meta device and so refuses
  buffers). Layers whose buffers change are refused before this (`buffers.refuse_stateful_layers`) and
  checked on the first step (`buffers.BufferWatch`).
* **Activation checkpointing without re-entrance** (`use_reentrant=False`, HF's default) re-runs each
  checkpointed forward inside the backward, which would capture every activation twice (and leave the
  per-sample gradient of each weight unfinished). A forward that runs during a backward while the module
  still holds its un-consumed activation from the real forward is that re-run: it is not captured again.
  (With `use_reentrant=True` the real forward runs without grad and captures nothing; its re-run in the
  backward is the one captured, as Opacus expects.)

Samplers are registered per hooks instance (a copy of Opacus' table), never in Opacus' global registry.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict

import torch
from opacus.grad_sample import GradSampleHooks
from opacus.grad_sample.embedding import compute_embedding_grad_sample
from torch import nn
from torch.utils._pytree import tree_flatten

from .scaled_embedding import embedding_scale, is_scaled_embedding


def _zero_padding_row(layer: nn.Embedding, out: dict) -> dict:
    if layer.padding_idx is not None and layer.weight in out:
        out[layer.weight][:, layer.padding_idx] = 0
    return out


def embedding_grad_sample(layer: nn.Embedding, activations, backprops) -> dict:
    """Opacus' embedding sampler, with the padding row of this layer's own contribution zeroed."""
    return _zero_padding_row(layer, compute_embedding_grad_sample(layer, activations, backprops))


def scaled_embedding_grad_sample(layer: nn.Embedding, activations, backprops) -> dict:
    """Embedding × c: the embedding's per-sample gradient with δ scaled by c."""
    scale = embedding_scale(layer)
    if scale is None:  # pragma: no cover - accepted when the hooks were built
        raise ValueError(f"{type(layer).__name__}: its forward is no longer embedding × constant")
    return embedding_grad_sample(layer, activations, backprops * scale)


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@contextlib.contextmanager
def _hooks_off(layer: nn.Module):
    """Run `layer` (and its children) without their module hooks: Opacus' full backward hooks wrap outputs in an
    autograd.Function that torch.func transforms refuse, and its forward hooks would record the re-run. The hook
    dicts themselves are put back (their removable handles keep working)."""
    saved = [(m, name, getattr(m, name)) for m in layer.modules() for name in _HOOK_DICTS]
    try:
        for m, name, _ in saved:
            setattr(m, name, OrderedDict())
        yield
    finally:
        for m, name, hooks in saved:
            setattr(m, name, hooks)


def buffered_grad_sample(layer: nn.Module, activations, backprops) -> dict:
    """Exact per-sample gradients of the layer's own trainable parameters by torch.func, with its buffers as they
    are: g_i = ∇_θ ⟨f(θ; x_i), δ_i⟩. `activations` are the layer's positional inputs (batch first)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in layer.named_parameters(recurse=False) if p.requires_grad}
    batch = backprops.shape[0]
    split = [i for i, a in enumerate(activations)
             if isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch]

    def weighted_output(pd, xs, d):
        args = list(activations)
        for i, x in zip(split, xs):
            args[i] = x.unsqueeze(0)
        out = functional_call(layer, pd, tuple(args))
        first = next(t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))
        return (first * d.unsqueeze(0)).sum()

    xs = tuple(activations[i] for i in split)
    with _hooks_off(layer):
        per_sample = vmap(grad(weighted_output), in_dims=(None, 0, 0))(params, xs, backprops)
    return {p: per_sample[n] for n, p in layer.named_parameters(recurse=False) if p.requires_grad}


def special_samplers(model: nn.Module) -> dict[type, object]:
    """{layer type: sampler} for the layers of `model` that need DoGraph's samplers (see the module docstring)."""
    out: dict[type, object] = {nn.Embedding: embedding_grad_sample}
    for module in model.modules():
        cls = type(module)
        if cls in out or cls in GradSampleHooks.GRAD_SAMPLERS:
            continue
        if not any(p.requires_grad for p in module.parameters(recurse=False)):
            continue
        if is_scaled_embedding(module):
            out[cls] = scaled_embedding_grad_sample
        elif any(True for _ in module.buffers()):  # Opacus' functorch path refuses any buffer in the subtree
            out[cls] = buffered_grad_sample
    return out


class DoGraphGradSampleHooks(GradSampleHooks):
    """`GradSampleHooks` (batch first, loss_reduction="sum", not strict) with the adjustments above."""

    def __init__(self, model: nn.Module):
        # An instance copy: Opacus' class-level table stays as it is.
        self.GRAD_SAMPLERS = {**GradSampleHooks.GRAD_SAMPLERS, **special_samplers(model)}
        self._sampling = False
        super().__init__(model, batch_first=True, loss_reduction="sum", strict=False)

    def capture_activations_hook(self, module, forward_input, _forward_output):
        if self._sampling:
            return  # a sampler re-running a module (torch.func) is not a forward of the model
        if torch._C._current_graph_task_id() != -1 and getattr(module, "activations", None):
            return  # a non-reentrant checkpoint's re-run: this call's activation is already held
        return super().capture_activations_hook(module, forward_input, _forward_output)

    def capture_backprops_hook(self, *args, **kwargs):
        self._sampling = True
        try:
            return super().capture_backprops_hook(*args, **kwargs)
        finally:
            self._sampling = False
