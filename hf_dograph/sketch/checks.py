"""Construction-time checks of a training set-up against a gradient engine.

The trainer builds its engine lazily (on the first step); `check_training_setup` lets it refuse a set-up that
cannot work when it is constructed, with a message that names the setting and the fix.
"""

from __future__ import annotations

from torch import nn

from .base import ENGINES

LOSS_ONLY = "loss-only"


def check_training_setup(engine_name: str, model: nn.Module, *, gradient_checkpointing: bool = False,
                         gradient_checkpointing_kwargs: dict | None = None, packed_sequences: bool = False) -> None:
    """Raise ValueError (or its subclass `UnsupportedLayerError`) if `engine_name` cannot train `model` this way.

    Args:
        engine_name: "factored", "opacus" (any name in `ENGINES`) or "loss-only" (the baselines' engine).
        model: the model as the engine will see it (unwrapped).
        gradient_checkpointing, gradient_checkpointing_kwargs: `TrainingArguments`' fields of those names. Both
            engines give exact per-sample gradients with activation checkpointing, `use_reentrant` True or False
            (HF's default); only malformed kwargs are refused.
        packed_sequences: whether batches hold several samples per row (padding-free packing, e.g.
            `DataCollatorWithFlattening`): only the factored engine can split rows into samples.

    Every refusal an engine makes at construction (layers with running statistics, unsupported layers) is raised
    here too: the engine is built once, with nothing attached to the model.
    """
    if engine_name != LOSS_ONLY and engine_name not in ENGINES:
        raise ValueError(f"grad_engine={engine_name!r} is unknown: use one of {', '.join(sorted(ENGINES))}.")
    if gradient_checkpointing_kwargs is not None:
        if not isinstance(gradient_checkpointing_kwargs, dict):
            raise ValueError("gradient_checkpointing_kwargs must be a dict (e.g. {'use_reentrant': False}), got "
                             f"{type(gradient_checkpointing_kwargs).__name__}")
        reentrant = gradient_checkpointing_kwargs.get("use_reentrant", False)
        if not isinstance(reentrant, bool):
            raise ValueError(f"gradient_checkpointing_kwargs['use_reentrant'] must be True or False, got {reentrant!r}")
    if packed_sequences and engine_name == "opacus":
        raise ValueError(
            "grad_engine='opacus' gives one gradient per batch row and cannot split packed sequences (several "
            "samples per row) into samples: use grad_engine='factored', or a collator that keeps one sample per row."
        )
    if engine_name != LOSS_ONLY:
        ENGINES[engine_name](model, projection_dim=1, seed=0)  # construction-time refusals, nothing attached
