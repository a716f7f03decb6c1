"""DoGraph settings, and `DoGraphConfig`: `TrainingArguments` plus those settings.

The DoGraph fields live in one small dataclass, `DoGraphSettings`, so that
`DoGraphTrainer` can also take a plain `TrainingArguments` (it then uses the
defaults below) and so that each field is documented once.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

BUILTIN_OBJECTIVES = ("uncertainty", "variance", "robust", "alignment")
GRAD_ENGINES = ("factored", "opacus")
STRATEGIES = ("dograph", "uniform", "loss_reweighting", "group_dro")
DOMAIN_MODES = ("persistent", "per_batch")
WEIGHT_MAPPINGS = ("sample", "domain")


@dataclass
class DoGraphSettings:
    """What DoGraph does at each step (see METHOD.md of the project)."""

    mixing_strategy: str = field(
        default="dograph",
        metadata={
            "help": "How samples are weighted: 'dograph' (model-perceived domains, the method), or a baseline "
            "with the same trainer: 'uniform' (plain mean gradient), 'loss_reweighting' (softmax of normalized "
            "per-sample losses), 'group_dro' (exponentiated-gradient weights over the human domain labels).",
            "choices": list(STRATEGIES),
        },
    )
    num_domains: int = field(
        default=11,
        metadata={"help": "m, the number of model-perceived domains (K-means clusters). Paper: 11."},
    )
    domain_mode: str = field(
        default="persistent",
        metadata={
            "help": "'persistent' (default): domains fitted on a window of recent samples, kept across steps, "
            "with statistics from many samples and smoothed weights; every sample is weighted by the domain "
            "model as it stood at the start of the optimizer step. 'per_batch': the paper read literally, "
            "K-means on each micro-batch and α_i = w_j / n_j (see docs/METHOD_NOTES.md for why it is not the "
            "default).",
            "choices": list(DOMAIN_MODES),
        },
    )
    projection_dim: int = field(
        default=1024,
        metadata={"help": "k, the dimension of each per-sample gradient sketch."},
    )
    objective: str = field(
        default="uncertainty",
        metadata={
            "help": "How domain weights are solved on the simplex: 'uncertainty' (w ∝ 1/(σ²+ε), the best in the "
            "paper), 'variance', 'robust' (softmax of domain losses), 'alignment', or a name registered in "
            "hf_dograph.objectives.OBJECTIVE_SOLVERS.",
        },
    )
    graph_lambda: float = field(
        default=0.0,
        metadata={"help": "λ ≥ 0: weight of the domain-graph smoothness term λ·wᵀL_G·w (0 turns it off)."},
    )
    grad_engine: str = field(
        default="factored",
        metadata={
            "help": "How per-sample gradient sketches are computed: 'factored' (fast; never forms per-sample "
            "gradients of weight matrices) or 'opacus' (reference; materializes every per-sample gradient).",
            "choices": list(GRAD_ENGINES),
        },
    )
    projection_seed: int = field(
        default=0,
        metadata={"help": "Seed of the random projection; fixed for the whole run (and stored in checkpoints)."},
    )
    uncertainty_eps: float = field(
        default=1.0,
        metadata={
            "help": "ε of the 'uncertainty' objective (w ∝ 1/(σ²+ε)), as a fraction of the mean intra-domain "
            "variance: the larger, the flatter the weights. Must be > 0. Default 1.0 (ε = mean σ²), chosen on "
            "the shared RedPajama data over 0.1 (docs/METHOD_NOTES.md §4)."
        },
    )
    robust_temperature: float = field(
        default=1.0, metadata={"help": "τ of the 'robust' objective: w = softmax(L/τ). Must be > 0."}
    )
    alignment_iters: int = field(
        default=10, metadata={"help": "Fixed-point iterations of the 'alignment' objective."}
    )
    variance_penalty: float = field(
        default=1.0,
        metadata={
            "help": "ρ of the 'variance' objective: weight of the penalty keeping Σ w_j z̄_j close to the plain mean."
        },
    )
    uniform_mix: float = field(
        default=0.0,
        metadata={"help": "γ in [0, 1]: final weights are (1-γ)·w + γ/m, a floor that keeps every domain alive."},
    )
    solver_iters: int = field(
        default=500, metadata={"help": "Iterations of the projected-gradient simplex solver (QP objectives)."}
    )
    kmeans_n_init: int = field(default=3, metadata={"help": "K-means restarts per clustering (best inertia kept)."})
    kmeans_max_iter: int = field(
        default=30,
        metadata={"help": "Lloyd iterations per K-means run (persistent domains run exactly this many on a GPU; "
                  "on the CPU they stop once the assignments repeat, with the same result; per_batch stops "
                  "earlier at convergence)."},
    )
    domain_refit_steps: int | None = field(
        default=None,
        metadata={
            "help": "Persistent domains: optimizer steps between K-means refits on the window (None: 20). "
            "'per_batch' re-clusters every micro-batch and takes only None or 1."
        },
    )
    domain_window: int = field(
        default=512,
        metadata={"help": "Persistent domains: how many recent samples (from all ranks) the domains and their "
                  "statistics are estimated from."},
    )
    domain_warmup_samples: int = field(
        default=256,
        metadata={"help": "Persistent domains: samples seen before the first fit; until then every weight is "
                  "uniform (logged as dograph/warmup = 1)."},
    )
    variance_shrinkage: float = field(
        default=8.0,
        metadata={"help": "κ ≥ 0: each domain's σ² is shrunk toward the pooled σ² as if κ samples of pooled "
                  "variance were added: (ν_j σ²_j + κ σ²_pool) / (ν_j + κ), ν_j = n_j − 1."},
    )
    weight_smoothing: float = field(
        default=0.1,
        metadata={"help": "β in (0, 1]: domain weights follow an exponential moving average, w ← (1-β)·w + "
                  "β·w_new, once per optimizer step (1 = no smoothing)."},
    )
    weight_mapping: str | None = field(
        default=None,
        metadata={
            "help": "How domain weights become sample weights. 'sample': a sample's weight is proportional to "
            "its domain's w_j (a domain's share of the step is then its frequency × w_j). 'domain': a domain's "
            "share is w_j itself (α_i = w_j / n_j, the paper's form). None: 'sample' for persistent domains, "
            "'domain' for per_batch (the paper read literally).",
            "choices": list(WEIGHT_MAPPINGS),
        },
    )
    nonfinite_step_limit: int = field(
        default=5,
        metadata={"help": "Training stops with a message after this many consecutive optimizer steps in which "
                  "no sample had a finite loss and gradient (a NaN model is never trained on or saved)."},
    )
    domain_label_column: str = field(
        default="domain",
        metadata={
            "help": "Name of the batch column holding human domain labels (ints). Never used for weighting by "
            "'dograph': only logged (NMI with the model's domains). Removed before the model's forward."
        },
    )
    loss_reweighting_temperature: float = field(
        default=1.0, metadata={"help": "Temperature of the 'loss_reweighting' baseline's softmax."}
    )
    group_dro_step_size: float = field(
        default=0.01, metadata={"help": "Exponentiated-gradient step size of the 'group_dro' baseline."}
    )

    def validate_dograph(self) -> None:
        """Raise a `ValueError` that names the field and the fix for any bad DoGraph setting."""
        for name, allowed in (("mixing_strategy", STRATEGIES), ("grad_engine", GRAD_ENGINES),
                              ("domain_mode", DOMAIN_MODES), ("weight_mapping", WEIGHT_MAPPINGS + (None,))):
            if getattr(self, name) not in allowed:
                choices = ', '.join(repr(a) for a in allowed)
                raise ValueError(f"{name}={getattr(self, name)!r} is unknown: use one of {choices}.")
        from .objectives import check_objective_name  # the registry knows its names (users may add their own)

        check_objective_name(self.objective)
        # Every number must be finite: an inf passes "> 0" and then breaks the first step.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name}={value} must be a finite number.")
        integers = ("num_domains", "projection_dim", "alignment_iters", "solver_iters", "kmeans_n_init",
                    "kmeans_max_iter", "domain_window", "nonfinite_step_limit")
        for name in integers:
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")
        positive = ("uncertainty_eps", "robust_temperature", "loss_reweighting_temperature", "group_dro_step_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0.")
        for name in ("graph_lambda", "variance_penalty", "variance_shrinkage"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0.")
        if not 0.0 <= self.uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix={self.uniform_mix} must be in [0, 1].")
        if not 0.0 < self.weight_smoothing <= 1.0:
            raise ValueError(f"weight_smoothing={self.weight_smoothing} must be in (0, 1] (1 = no smoothing).")
        if self.domain_warmup_samples < 0:
            raise ValueError(f"domain_warmup_samples={self.domain_warmup_samples} must be >= 0.")
        if self.domain_refit_steps is not None:
            if int(self.domain_refit_steps) < 1:
                raise ValueError(f"domain_refit_steps={self.domain_refit_steps} must be >= 1 (or None: 20).")
            if self.domain_mode == "per_batch" and int(self.domain_refit_steps) != 1:
                raise ValueError(
                    f"domain_refit_steps={self.domain_refit_steps} needs domain_mode='persistent': 'per_batch' "
                    "re-clusters every micro-batch. Use domain_mode='persistent' for domains kept across steps."
                )

    @property
    def refit_steps(self) -> int:
        """Optimizer steps between refits of the persistent domains (the resolved `domain_refit_steps`)."""
        return 20 if self.domain_refit_steps is None else int(self.domain_refit_steps)

    @property
    def mapping(self) -> str:
        """The resolved `weight_mapping`: 'sample' or 'domain'."""
        if self.weight_mapping is not None:
            return self.weight_mapping
        return "sample" if self.domain_mode == "persistent" else "domain"

    @classmethod
    def from_args(cls, args) -> DoGraphSettings:
        """The DoGraph settings carried by `args` (a `DoGraphConfig`), or the defaults for a plain
        `TrainingArguments`; validated either way."""
        values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
        settings = cls(**values)
        settings.validate_dograph()
        return settings

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(DoGraphSettings)}


@dataclass
class DoGraphConfig(TrainingArguments, DoGraphSettings):
    """`transformers.TrainingArguments` plus the DoGraph settings.

    Loads from YAML/JSON/command line with `HfArgumentParser` like any `TrainingArguments`::

        args = DoGraphConfig(output_dir="out", num_domains=11, projection_dim=1024, objective="uncertainty")
    """

    def __post_init__(self):
        super().__post_init__()
        self.validate_dograph()

    def dograph_settings(self) -> DoGraphSettings:
        return DoGraphSettings.from_args(self)
