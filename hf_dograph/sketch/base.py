"""The contract between `DoGraphTrainer` and a per-sample gradient engine.

One micro-batch goes through an engine like this (the trainer's `training_step`)::

    with engine.capturing():                 # hooks on for this forward/backward only
        losses = per_sample_losses(model, batch)     # (B,)
        engine.backward(losses)              # per-sample information; leaves every p.grad as it was
    z = engine.sketches()                    # (B, k) sketches of the per-sample gradients g_i
    ok = engine.finite_samples()             # (B,) False where g_i holds inf/NaN
    ... domains, weights, α (α_i = 0 where not ok) ...
    engine.accumulate_weighted_gradient(α, scale)    # p.grad += scale · Σ_i α_i g_i, exactly
    engine.clear()

Engines register themselves by name in `ENGINES` (see `register_engine`).
"""

from __future__ import annotations

import abc
import contextlib
from typing import ClassVar

import torch
from torch import nn

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
    def backward(self, losses: torch.Tensor) -> None:
        """Back-propagate Σ_i ℓ_i to collect per-sample information; every `p.grad` is left unchanged."""

    @abc.abstractmethod
    def sketches(self) -> torch.Tensor:
        """(B, k) float32: z_i, a random projection of g_i with E‖z_i‖² = ‖g_i‖² (rows of non-finite samples: 0)."""

    @abc.abstractmethod
    def finite_samples(self) -> torch.Tensor:
        """(B,) bool: whether sample i's per-sample gradient is finite."""

    @abc.abstractmethod
    def accumulate_weighted_gradient(self, alpha: torch.Tensor, scale: float = 1.0) -> None:
        """p.grad += scale · Σ_i α_i g_i for every trainable p. Samples with α_i = 0 contribute exactly 0,
        even if their gradient is not finite."""

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
