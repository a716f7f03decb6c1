"""The reference engine: every per-sample gradient materialized by Opacus hooks, then projected densely.

Exact and simple, and costly: it holds B × d numbers (d = trainable parameters) and projects them
with a k × d Gaussian generated block by block. Use it to check the fast engine, and for small models.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn

from .base import GradEngine, UnsupportedLayerError, register_engine
from .projection import BlockGaussianProjection

logger = logging.getLogger(__name__)


def _clear_grad_sample(p: nn.Parameter) -> None:
    # A second backward would turn grad_sample into a list and mix two steps: clear it every step.
    p.grad_sample = None
    if hasattr(p, "_current_grad_sample"):
        del p._current_grad_sample


def _unsupported_layers(model: nn.Module) -> list[str]:
    """Trainable layers Opacus cannot give per-sample gradients for (trainable params and buffers)."""
    out = []
    for name, module in model.named_modules():
        own_trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        if own_trainable and any(True for _ in module.buffers(recurse=False)):
            out.append(f"{name or '<root>'} ({type(module).__name__})")
    return out


@register_engine
class OpacusEngine(GradEngine):
    """Per-sample gradients from `opacus.grad_sample.GradSampleHooks` (no wrapping: names and type stay)."""

    name = "opacus"

    def __init__(self, model: nn.Module, *, projection_dim: int, seed: int):
        super().__init__(model, projection_dim=projection_dim, seed=seed)
        bad = _unsupported_layers(model)
        if bad:
            raise UnsupportedLayerError(
                "DoGraph cannot compute per-sample gradients for these trainable layers, which keep running "
                f"statistics in buffers: {', '.join(bad)}. Freeze them (requires_grad=False) or replace them "
                "(e.g. BatchNorm → LayerNorm/GroupNorm)."
            )
        # One independent projection block-stream per parameter; together they are one k × d Gaussian R.
        self.projections = [
            BlockGaussianProjection(p.numel(), self.projection_dim, seed=self.seed, stream=i)
            for i, (_, p) in enumerate(self.params)
        ]
        # Opacus' embedding sampler ignores padding_idx; autograd gives that row no gradient. Remember the rows.
        self._padding_rows = {
            id(m.weight): m.padding_idx
            for m in model.modules()
            if isinstance(m, nn.Embedding) and m.padding_idx is not None and m.weight.requires_grad
        }
        self._hooks = None
        self._per_sample: list[torch.Tensor] | None = None
        self._finite: torch.Tensor | None = None

    # -- lifetime -------------------------------------------------------------------------------
    def attach(self) -> None:
        from opacus.grad_sample import GradSampleHooks

        if self._hooks is None:
            # loss_reduction="sum": we back-propagate Σ_i ℓ_i, so grad_sample[i] = ∇ℓ_i exactly.
            self._hooks = GradSampleHooks(self.model, batch_first=True, loss_reduction="sum", strict=False)
            self._hooks.disable_hooks()

    def detach(self) -> None:
        if self._hooks is not None:
            self._hooks.remove_hooks()
            self._hooks = None
            for _, p in self.params:
                _clear_grad_sample(p)
                for attr in ("grad_sample", "_forward_counter"):
                    if hasattr(p, attr):
                        delattr(p, attr)

    @contextlib.contextmanager
    def capturing(self):
        self.attach()
        for _, p in self.params:
            _clear_grad_sample(p)
        self._hooks.enable_hooks()
        try:
            yield
        finally:
            self._hooks.disable_hooks()

    # -- one micro-batch ------------------------------------------------------------------------
    def backward(self, losses: torch.Tensor) -> None:
        saved = [p.grad for _, p in self.params]
        for _, p in self.params:
            p.grad = None
        try:
            with warnings.catch_warnings():
                # Embeddings take integer inputs, so torch notes that their full backward hooks fire on output
                # gradients only: that is what Opacus needs.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()
        finally:
            # The unweighted Σ g_i that autograd just wrote is not the step's gradient: put back what was there.
            for (_, p), g in zip(self.params, saved):
                p.grad = g
        batch = losses.shape[0]
        per_sample = []
        for name, p in self.params:
            gs = getattr(p, "grad_sample", None)
            if gs is None:
                raise UnsupportedLayerError(
                    f"no per-sample gradient reached parameter {name!r}: it is used outside any module call "
                    "Opacus can hook (e.g. a bare nn.Parameter used in a custom forward). Freeze it, or wrap "
                    "its use in an nn.Module."
                )
            pad = self._padding_rows.get(id(p))
            if isinstance(gs, list):  # tied weights (GPT-2 wte = lm_head): one entry per using module
                if pad is not None:
                    # Hooks fire in backward order, so the embedding (first in the forward) comes last.
                    gs[-1][:, pad] = 0
                gs = torch.stack(gs).sum(0)
            elif pad is not None:
                gs[:, pad] = 0
            if gs.shape[0] != batch:
                raise UnsupportedLayerError(
                    f"parameter {name!r} got a per-sample gradient for {gs.shape[0]} samples instead of "
                    f"{batch}: an input with batch size 1 was broadcast (pass it expanded to the batch, "
                    "e.g. position_ids of shape (B, T))."
                )
            per_sample.append(gs.detach().reshape(batch, -1))
        self._per_sample = per_sample
        self._finite = torch.stack([torch.isfinite(g).all(dim=1) for g in per_sample]).all(dim=0)
        for _, p in self.params:
            _clear_grad_sample(p)

    def per_sample_gradients(self) -> dict[str, torch.Tensor]:
        """{name: (B, *shape)} the per-sample gradients of the last `backward` (for tests and inspection)."""
        return {n: g.reshape(g.shape[0], *p.shape) for (n, p), g in zip(self.params, self._per_sample)}

    def sketches(self) -> torch.Tensor:
        ok = self._finite
        z = None
        for proj, g in zip(self.projections, self._per_sample):
            part = proj(torch.where(ok[:, None], g, torch.zeros((), dtype=g.dtype, device=g.device)))
            z = part if z is None else z + part
        return z.float()

    def finite_samples(self) -> torch.Tensor:
        return self._finite

    def accumulate_weighted_gradient(self, alpha: torch.Tensor, scale: float = 1.0) -> None:
        keep = alpha != 0
        a = (alpha[keep] * scale).to(torch.float32)
        for (_, p), g in zip(self.params, self._per_sample):
            # Only kept samples enter the sum: 0 · NaN would still be NaN.
            contrib = (a.to(g.dtype) @ g[keep]).reshape(p.shape).to(p.dtype)
            if p.grad is None:
                p.grad = contrib
            else:
                p.grad.add_(contrib)

    def clear(self) -> None:
        self._per_sample = None
        self._finite = None
