"""The engine of the baseline strategies: weights from losses alone, gradient by one ordinary backward.

`uniform`, `loss_reweighting` and `group_dro` choose α from the per-sample losses (and human labels), never
from gradients, so they need no per-sample gradient at all: the weighted gradient Σ_i α_i g_i is the
gradient of Σ_i α_i ℓ_i, one backward through the graph the forward already built. A baseline step then
costs what a plain `Trainer` step costs, and the benchmark's wall times compare the methods, not the
engines.

What this engine cannot do is leave one sample out of that batched backward: the gradient of α_i ℓ_i
with α_i = 0 is still NaN when sample i's activations are. So:
- a non-finite *loss* is seen before the backward (`finite_samples`); the trainer then redoes that
  micro-batch with a per-sample engine, which leaves exactly the bad samples out;
- a non-finite *gradient* from finite losses (an overflow in the backward) is only seen after it: the
  micro-batch's contribution is dropped whole, the gradients accumulated so far are kept, and the
  trainer counts its samples as left out (`samples_dropped_after_weighting`).

With `keep_nonfinite=True` (fp16 with a GradScaler) none of that happens: the weighted backward runs as it
is and whatever it gives, inf/NaN included, is added to `.grad` — the scaler then sees the overflow and
skips the step, as it does for the plain `Trainer`.

The losses are one per sample of the batch's `SampleLayout` (rows or packed segments): this engine only
needs them, so any layout works.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .base import GradEngine, resolve_layout
from .fsdp import full_value, is_sharded
from .layout import SampleLayout

logger = logging.getLogger(__name__)


class LossOnlyEngine(GradEngine):
    """Per-sample losses only; `accumulate_weighted_gradient` backpropagates Σ α_i ℓ_i once.

    Args:
        model: the model whose trainable parameters receive the weighted gradient.
        keep_nonfinite: False (default): a micro-batch whose weighted gradient is not finite is left out (its
            `.grad` contribution dropped, the samples counted by `samples_dropped_after_weighting`), and a
            non-finite loss is an error (the trainer redoes that micro-batch per sample). True: non-finite
            losses and gradients are back-propagated and accumulated as they are, for a GradScaler to detect
            (fp16); nothing is dropped. Also settable as an attribute.
    """

    name = "loss-only"
    computes_sketches = False

    def __init__(self, model: nn.Module, *, projection_dim: int = 0, seed: int = 0, keep_nonfinite: bool = False):
        super().__init__(model, projection_dim=projection_dim, seed=seed)
        if not isinstance(keep_nonfinite, bool):
            raise ValueError(f"keep_nonfinite must be True or False, got {keep_nonfinite!r}")
        self.keep_nonfinite = keep_nonfinite
        self._losses: torch.Tensor | None = None
        self._dropped = 0

    def backward(self, losses: torch.Tensor, layout: SampleLayout | None = None) -> None:
        # Nothing to do yet: the only backward this engine runs needs α.
        resolve_layout(losses, layout)
        self._losses = losses
        self._dropped = 0

    def sketches(self) -> torch.Tensor:
        raise RuntimeError(
            "the loss-only engine of the baseline strategies computes no gradient sketches; "
            "mixing_strategy='dograph' uses a per-sample engine (grad_engine='factored' or 'opacus')"
        )

    def finite_samples(self) -> torch.Tensor:
        return torch.isfinite(self._losses.detach())

    def accumulate_weighted_gradient(self, alpha: torch.Tensor, scale: float = 1.0, *,
                                     nonfinite_left_out: bool | None = None) -> None:
        losses = self._losses
        if alpha.shape != losses.shape:
            raise ValueError(f"alpha has shape {tuple(alpha.shape)}; expected {tuple(losses.shape)}: one weight per "
                             "sample")
        weighted = (alpha.to(device=losses.device, dtype=losses.dtype) * losses).sum() * scale
        if self.keep_nonfinite:
            weighted.backward()  # straight into .grad: a GradScaler sees any inf/NaN and skips the step
            return
        # Back-propagate into fresh .grad tensors so that a non-finite result can be dropped without losing
        # the micro-batches accumulated before it.
        saved = [p.grad for _, p in self.params]
        for _, p in self.params:
            p.grad = None
        weighted.backward()
        new = [p.grad for _, p in self.params]
        # One device→host read for the whole check, not one per parameter: are the losses finite (the trainer
        # redoes a micro-batch with a non-finite loss per sample, so they must be), and is every new gradient?
        flags = [torch.isfinite(losses.detach()).all()]
        flags += _all_finite_flags([g for g in new if g is not None], flags[0].device)
        losses_finite, *grads_finite = torch.stack(flags).tolist()
        if not losses_finite:
            for (_, p), old in zip(self.params, saved):
                p.grad = old
            raise RuntimeError("a non-finite loss reached the loss-only backward; redo the batch per sample")
        finite = all(grads_finite)
        for (_, p), old, g in zip(self.params, saved, new):
            if not finite:
                # Zeros rather than None: every rank must all-reduce the same list of tensors.
                p.grad = old if old is not None else torch.zeros_like(p)
            elif old is None:
                p.grad = g
            elif g is not None:
                p.grad = old.add_(g)
            else:
                p.grad = old
        if not finite:
            self._dropped = int(losses.shape[0])
            logger.warning(
                "a non-finite gradient came from finite losses (an overflow in the backward?): this micro-batch's "
                "%d samples are left out of the step", self._dropped,
            )

    def samples_dropped_after_weighting(self) -> int:
        return self._dropped

    def clear(self) -> None:
        self._losses = None


def _all_finite_flags(grads: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """0-dim bool tensors on `device`, together true exactly when every entry of every gradient is finite.

    One `_foreach_norm` of order ∞ (max |g|) per device and dtype for all plain tensors, a handful of ops rather than
    `isfinite(g).all()`'s ~5 per parameter (900 per step on GPT-2 small's 150 parameters: host time a GPU waits
    for). Max |g| is non-finite exactly when some entry is: inf stays inf, NaN propagates through the max, and
    unlike a 2-norm it cannot overflow on finite entries. A flag of an FSDP2-sharded gradient is a DTensor:
    `full_value` gathers it (a collective, no host read)."""
    flags, groups = [], {}
    for g in grads:
        if is_sharded(g):
            flags.append(full_value(torch.isfinite(g).all()))
        else:
            groups.setdefault((g.device, g.dtype), []).append(g)
    for tensors in groups.values():
        max_abs = torch.stack(torch._foreach_norm(tensors, float("inf")))
        flags.append(torch.isfinite(max_abs).all().to(device))
    return flags
