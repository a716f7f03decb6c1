"""The contract between `DoGraphTrainer` and a per-sample gradient engine.

One micro-batch goes through an engine like this (the trainer's `training_step`)::

    with engine.capturing():                 # hooks on for this forward/backward only
        losses = per_sample_losses(model, batch)     # (S,): one loss per *sample*
        engine.backward(losses, layout)      # per-sample information; leaves every p.grad as it was
    z = engine.sketches()                    # (S, k) sketches of the per-sample gradients g_s
    ok = engine.finite_samples()             # (S,) False where g_s holds inf/NaN
    ... domains, weights, α (α_s = 0 where not ok) ...
    engine.accumulate_weighted_gradient(α, scale)    # p.grad += scale · Σ_s α_s g_s, exactly
    engine.clear()

A *sample* is what `layout` (a `SampleLayout`) says: by default (layout=None) sample i is row i of the batch
(S = B); with padding-free packing a sample is one packed segment of a row (`SampleLayout.segments`), and
S counts segments. Engines that cannot split rows into samples refuse a segment layout with a clear error.

Losses may be multiplied by a loss scale (fp16 GradScaler): sketches and the weighted gradient scale with it
(the trainer divides the sketches back), and samples whose gradient is not finite reach `.grad` as inf/NaN
whenever their α_s ≠ 0 — which is what lets the scaler see the overflow and skip the step.

Engines register themselves by name in `ENGINES` (see `register_engine`).
"""

from __future__ import annotations

import abc
import contextlib
from typing import ClassVar

import torch
from torch import nn

from .layout import SampleLayout

ENGINES: dict[str, type[GradEngine]] = {}


def register_engine(cls: type[GradEngine]) -> type[GradEngine]:
    """Class decorator: make an engine available as `grad_engine=<cls.name>`."""
    ENGINES[cls.name] = cls
    return cls


def build_engine(name: str, model: nn.Module, *, projection_dim: int, seed: int) -> GradEngine:
    if name not in ENGINES:
        raise ValueError(f"grad_engine={name!r} is unknown: use one of {', '.join(sorted(ENGINES))}.")
    return ENGINES[name](model, projection_dim=projection_dim, seed=seed)


def trainable_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The parameters DoGraph sketches and reweights: those that require grad (tied ones once)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


class UnsupportedLayerError(ValueError):
    """A trainable layer that no engine can give per-sample gradients for."""


class GradEngine(abc.ABC):
    """Per-sample gradient sketches of one micro-batch, then the exact weighted gradient."""

    name: ClassVar[str]
    computes_sketches: ClassVar[bool] = True  # False: losses only (the baselines' engine)

    def __init__(self, model: nn.Module, *, projection_dim: int, seed: int):
        self.model = model
        self.projection_dim = int(projection_dim)
        self.seed = int(seed)
        self.params = trainable_parameters(model)
        if not self.params:
            raise ValueError("the model has no trainable parameters: nothing for DoGraph to weight")

    # -- lifetime -------------------------------------------------------------------------------
    def attach(self) -> None:
        """Install whatever hooks the engine needs (once, before training)."""

    def detach(self) -> None:
        """Remove them again; the model is left as it was."""

    @contextlib.contextmanager
    def capturing(self):
        """Context in which the micro-batch's forward and `backward` run."""
        yield

    # -- one micro-batch ------------------------------------------------------------------------
    @abc.abstractmethod
    def backward(self, losses: torch.Tensor, layout: SampleLayout | None = None) -> None:
        """Back-propagate Σ_s ℓ_s to collect per-sample information; every `p.grad` is left unchanged.

        `losses` is (S,), one loss per sample of `layout` (None: `SampleLayout.rows(len(losses))`)."""

    @abc.abstractmethod
    def sketches(self) -> torch.Tensor:
        """(S, k) float32: z_s, a random projection of g_s with E‖z_s‖² = ‖g_s‖² (rows of non-finite samples: 0)."""

    @abc.abstractmethod
    def finite_samples(self) -> torch.Tensor:
        """(S,) bool: whether sample s's per-sample gradient is finite."""

    @abc.abstractmethod
    def accumulate_weighted_gradient(self, alpha: torch.Tensor, scale: float = 1.0, *,
                                     nonfinite_left_out: bool | None = None) -> None:
        """p.grad += scale · Σ_s α_s g_s for every trainable p, α of shape (S,). Samples with α_s = 0 contribute
        exactly 0, even if their gradient is not finite; samples with α_s ≠ 0 contribute what they hold, inf/NaN
        included. `nonfinite_left_out`: whether some sample with α_s = 0 holds inf/NaN, when the caller already
        knows it (None: the engine finds out itself if it needs to; engines that never mix such a sample in
        ignore it)."""

    def samples_dropped_after_weighting(self) -> int:
        """Samples of the last micro-batch that `accumulate_weighted_gradient` had to leave out (0 for engines
        that see every per-sample gradient before α is chosen)."""
        return 0

    def clear(self) -> None:
        """Drop the micro-batch's stored tensors."""

    def log_lines(self) -> list[str]:
        """One-time notes for the log (e.g. which layers fell back to another engine)."""
        return []


def keep_mask(alpha: torch.Tensor) -> torch.Tensor:
    return alpha != 0


def resolve_layout(losses: torch.Tensor, layout: SampleLayout | None) -> SampleLayout:
    """The layout of a `backward` call (rows by default), checked against the losses' shape."""
    if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
        shape = tuple(getattr(losses, "shape", ()))
        raise ValueError(f"losses must be a 1-D tensor (one loss per sample), got shape {shape}")
    if layout is None:
        return SampleLayout.rows(losses.shape[0])
    if not isinstance(layout, SampleLayout):
        raise TypeError(f"layout must be a SampleLayout (or None for one sample per row), got {type(layout).__name__}")
    if losses.shape[0] != layout.num_samples:
        raise ValueError(f"got {losses.shape[0]} losses for a layout of {layout.num_samples} samples ({layout!r}): "
                         "pass one loss per sample")
    return layout
