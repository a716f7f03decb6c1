"""The reference engine: every per-sample gradient materialized by Opacus hooks, then projected densely.

Exact and simple, and costly: it holds B × d numbers (d = trainable parameters) and projects them
with a k × d Gaussian generated block by block. Use it to check the fast engine, and for small models.

Opacus gives one gradient per *row* of the batch, so this engine refuses packed sequences (a segment
`SampleLayout`): use `grad_engine='factored'` for those. What it adjusts in Opacus (padding rows of tied
embeddings, scaled embeddings, layers with constant buffers, non-reentrant activation checkpointing) is in
`opacus_hooks`.
"""

from __future__ import annotations

import contextlib
import logging
import warnings

import torch
from torch import nn

from .base import GradEngine, UnsupportedLayerError, register_engine, resolve_layout
from .buffers import BufferWatch, refuse_stateful_layers
from .layout import SampleLayout
from .projection import BlockGaussianProjection

logger = logging.getLogger(__name__)


def _clear_grad_sample(p: nn.Parameter) -> None:
    # A second backward would turn grad_sample into a list and mix two steps: clear it every step.
    p.grad_sample = None
    if hasattr(p, "_current_grad_sample"):
        del p._current_grad_sample


@register_engine
class OpacusEngine(GradEngine):
    """Per-sample gradients from `opacus.grad_sample.GradSampleHooks` (no wrapping: names and type stay)."""

    name = "opacus"

    def __init__(self, model: nn.Module, *, projection_dim: int, seed: int):
        super().__init__(model, projection_dim=projection_dim, seed=seed)
        refuse_stateful_layers(model)
        # One independent projection block-stream per parameter; together they are one k × d Gaussian R.
        self.projections = [
            BlockGaussianProjection(p.numel(), self.projection_dim, seed=self.seed, stream=i)
            for i, (_, p) in enumerate(self.params)
        ]
        self._buffers = BufferWatch(model)
        self._hooks = None
        self._per_sample: list[torch.Tensor] | None = None
        self._finite: torch.Tensor | None = None

    # -- lifetime -------------------------------------------------------------------------------
    def attach(self) -> None:
        from .opacus_hooks import DoGraphGradSampleHooks

        if self._hooks is None:
            # loss_reduction="sum": we back-propagate Σ_i ℓ_i, so grad_sample[i] = ∇ℓ_i exactly.
            self._hooks = DoGraphGradSampleHooks(self.model)
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
            if hasattr(p, "_forward_counter"):
                p._forward_counter = 0  # a step that failed half-way leaves its count behind
        for m in self.model.modules():  # …and its activations
            if getattr(m, "activations", None):
                m.activations = []
        self._buffers.start()
        self._hooks.enable_hooks()
        try:
            yield
        finally:
            self._hooks.disable_hooks()

    # -- one micro-batch ------------------------------------------------------------------------
    def backward(self, losses: torch.Tensor, layout: SampleLayout | None = None) -> None:
        layout = resolve_layout(losses, layout)
        if not layout.is_rows:
            raise UnsupportedLayerError(
                f"grad_engine='opacus' computes one gradient per batch row and cannot split packed sequences "
                f"({layout!r}) into samples: use grad_engine='factored' with packing, or train unpacked."
            )
        saved = [p.grad for _, p in self.params]
        for _, p in self.params:
            p.grad = None
        try:
            with warnings.catch_warnings():
                # Embeddings take integer inputs, so torch notes that their full backward hooks fire on output
                # gradients only: that is what Opacus needs.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses.sum().backward()
        except Exception as err:
            # A sampler re-running a layer that writes its buffers fails inside the backward: name the layer.
            try:
                self._buffers.check()
            except UnsupportedLayerError as named:
                raise named from err
            raise
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
            if isinstance(gs, list):  # a weight whose uses Opacus did not sum (older Opacus): one entry per use
                gs = torch.stack(gs).sum(0)
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
        self._buffers.check()

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

    def accumulate_weighted_gradient(self, alpha: torch.Tensor, scale: float = 1.0, *,
                                     nonfinite_left_out: bool | None = None) -> None:
        if self._per_sample is None:
            raise RuntimeError("accumulate_weighted_gradient needs a captured micro-batch: call backward() first")
        if alpha.shape != (self._finite.shape[0],):
            raise ValueError(f"alpha has shape {tuple(alpha.shape)}; expected ({self._finite.shape[0]},): one weight "
                             "per sample of the last backward")
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
