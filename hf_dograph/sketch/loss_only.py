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
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .base import GradEngine

logger = logging.getLogger(__name__)


class LossOnlyEngine(GradEngine):
    """Per-sample losses only; `accumulate_weighted_gradient` backpropagates Σ α_i ℓ_i once."""

    name = "loss-only"
    computes_sketches = False

    def __init__(self, model: nn.Module, *, projection_dim: int = 0, seed: int = 0):
        super().__init__(model, projection_dim=projection_dim, seed=seed)
        self._losses: torch.Tensor | None = None
        self._dropped = 0

    def backward(self, losses: torch.Tensor) -> None:
        # Nothing to do yet: the only backward this engine runs needs α.
        self._losses = losses
        self._dropped = 0

    def sketches(self) -> torch.Tensor:
        raise RuntimeError(
            "the loss-only engine of the baseline strategies computes no gradient sketches; "
            "mixing_strategy='dograph' uses a per-sample engine (grad_engine='factored' or 'opacus')"
        )

    def finite_samples(self) -> torch.Tensor:
        return torch.isfinite(self._losses.detach())

    def accumulate_weighted_gradient(self, alpha: torch.Tensor, scale: float = 1.0) -> None:
        losses = self._losses
        if not bool(torch.isfinite(losses.detach()).all()):
            raise RuntimeError("a non-finite loss reached the loss-only backward; redo the batch per sample")
        # Back-propagate into fresh .grad tensors so that a non-finite result can be dropped without losing
        # the micro-batches accumulated before it.
        saved = [p.grad for _, p in self.params]
        for _, p in self.params:
            p.grad = None
        weighted = (alpha.to(device=losses.device, dtype=losses.dtype) * losses).sum() * scale
        weighted.backward()
        new = [p.grad for _, p in self.params]
        finite = all(g is None or bool(torch.isfinite(g).all()) for g in new)
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
