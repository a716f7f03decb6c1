"""DoGraph settings, and `DoGraphConfig`: `TrainingArguments` plus those settings.

The DoGraph fields live in one small dataclass, `DoGraphSettings`, so that
`DoGraphTrainer` can also take a plain `TrainingArguments` (it then uses the
defaults below) and so that each field is documented once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from transformers import TrainingArguments

BUILTIN_OBJECTIVES = ("uncertainty", "variance", "robust", "alignment")
GRAD_ENGINES = ("factored", "opacus")
STRATEGIES = ("dograph", "uniform", "loss_reweighting", "group_dro")


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
        metadata={"help": "m, the number of model-perceived domains (K-means clusters) per step. Paper: 11."},
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
        default=0.1,
        metadata={
            "help": "ε of the 'uncertainty' objective, as a fraction of the batch's mean intra-domain variance: "
            "keeps a one-sample domain (σ²=0) from taking all the weight. Must be > 0."
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
    kmeans_max_iter: int = field(default=100, metadata={"help": "Maximum Lloyd iterations per K-means run."})
    domain_refit_steps: int = field(
        default=1,
        metadata={
            "help": "Online domains: 1 re-clusters every micro-batch; N > 1 keeps the centroids and assigns new "
            "batches to them, refitting every N optimizer steps."
        },
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
        if self.mixing_strategy not in STRATEGIES:
            raise ValueError(
                f"mixing_strategy={self.mixing_strategy!r} is unknown: use one of {', '.join(STRATEGIES)}."
            )
        from .objectives import OBJECTIVE_SOLVERS  # the registry: users may add their own objectives

        if self.objective not in OBJECTIVE_SOLVERS:
            raise ValueError(
                f"objective={self.objective!r} is unknown: use one of {', '.join(OBJECTIVE_SOLVERS)} "
                "(or register yours in hf_dograph.objectives.OBJECTIVE_SOLVERS)."
            )
        if self.grad_engine not in GRAD_ENGINES:
            raise ValueError(f"grad_engine={self.grad_engine!r} is unknown: use one of {', '.join(GRAD_ENGINES)}.")
        if int(self.num_domains) < 1:
            raise ValueError(f"num_domains={self.num_domains} must be >= 1 (the paper uses 11).")
        if int(self.projection_dim) < 1:
            raise ValueError(f"projection_dim={self.projection_dim} must be >= 1 (e.g. 1024).")
        positive = ("uncertainty_eps", "robust_temperature", "loss_reweighting_temperature", "group_dro_step_size")
        for name in positive:
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0.")
        if self.graph_lambda < 0:
            raise ValueError(f"graph_lambda={self.graph_lambda} must be >= 0 (0 turns the graph term off).")
        if self.variance_penalty < 0:
            raise ValueError(f"variance_penalty={self.variance_penalty} must be >= 0.")
        if not 0.0 <= self.uniform_mix <= 1.0:
            raise ValueError(f"uniform_mix={self.uniform_mix} must be in [0, 1].")
        for name in ("alignment_iters", "solver_iters", "kmeans_n_init", "kmeans_max_iter", "domain_refit_steps"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1.")

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
