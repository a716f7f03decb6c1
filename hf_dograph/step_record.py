"""What DoGraph records of its steps: the last micro-batch's decision, the optimizer step's accumulated
samples, the metrics flushed with the Trainer's logs and the weight-history entries the plots and card read.

Everything is kept as tensors while training (nothing here waits for the device); numbers are made at
logging and saving time (`history_entry`, `StepAccumulator.take_nmi`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .distributed import gather_rows, is_distributed


@dataclass
class DoGraphStepRecord:
    """What DoGraph decided for the last micro-batch (`trainer.dograph_last`); tensors, on the model's device.

    Samples left out of the step (non-finite loss or gradient, or no label) have assignment -1 and weight 0.
    """

    assignments: torch.Tensor  # (S,) model domain of each sample (-1: left out / none)
    sample_weights: torch.Tensor  # (S,) α_i = v_i μ_i, what multiplies each ℓ_i in the backward
    multipliers: torch.Tensor  # (S,) v_i (1 = the Trainer's weight)
    losses: torch.Tensor  # (S,) ℓ_i
    shares: torch.Tensor  # (S,) μ_i, each sample's share of the Trainer's loss
    domain_weights: torch.Tensor | None = None  # (m,) w on the simplex (None: no domains yet / a baseline)
    cluster_sizes: torch.Tensor | None = None
    sigma2: torch.Tensor | None = None
    domain_losses: torch.Tensor | None = None
    objective_value: torch.Tensor | None = None
    warmup: bool = False
    human_domains: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


def summarize_step(step: StepAccumulator, *, step_number: int, dograph: bool, per_micro_batch: bool
                   ) -> tuple[dict[str, torch.Tensor], dict]:
    """The metrics (tensors) and the pending history entry of the accumulated micro-batch(es), gathered over
    ranks; resets the accumulator's samples."""
    alpha = torch.cat(step.alphas).double()
    shares = torch.cat(step.shares).double()
    kept = torch.cat(step.kepts)
    losses = torch.cat(step.losses).double()
    assign = torch.cat(step.assignments)
    human = torch.cat(step.humans) if step.humans and len(step.humans) == len(step.alphas) else None
    if is_distributed():
        cols = [alpha, kept.double(), losses, assign.double(), shares] + ([human.double()] if human is not None else [])
        rows = gather_rows(torch.stack(cols, dim=1))[0]
        alpha, kept, losses, assign, shares = rows[:, 0], rows[:, 1] > 0, rows[:, 2], rows[:, 3].long(), rows[:, 4]
        human = rows[:, 5].long() if human is not None else None
    total = alpha.sum()
    metrics = {
        # Effective sample size of the weights (Kish), relative to the samples kept: 1 = equal weights.
        "ess": (total ** 2 / (alpha ** 2).sum().clamp(min=1e-300)) / kept.sum().clamp(min=1),
        "weighted_loss": (alpha * torch.nan_to_num(losses)).sum() / total.clamp(min=1e-300),
        "sample_weight_max": alpha.max() / total.clamp(min=1e-300),
        # The step's total weight relative to the Trainer's (Σ v μ / Σ μ): 1 on average by construction.
        "weight_mean": total / shares.sum().clamp(min=1e-300),
        "nonfinite_samples": (~kept).sum().double() + step.dropped,
    }
    decision = step.last_decision
    if decision is not None and decision.domain_weights is not None:
        w = decision.domain_weights.double()
        ent = -torch.special.xlogy(w, w).sum()  # 0 log 0 = 0, without selecting w > 0 (a host read on a GPU)
        metrics.update(weight_entropy=ent, effective_domains=ent.exp(), num_domains=torch.tensor(float(w.numel())))
        if decision.cluster_sizes is not None:
            metrics.update(cluster_size_min=decision.cluster_sizes.double().min(),
                           cluster_size_max=decision.cluster_sizes.double().max())
        if decision.objective_value is not None:
            metrics["objective"] = torch.as_tensor(decision.objective_value).double()
    if dograph:
        metrics["warmup"] = torch.tensor(1.0 if (decision is not None and decision.warmup) else 0.0)
        if human is not None and decision is not None and decision.domain_weights is not None:
            # agreement of model and human domains, once model domains exist (not during the warm-up)
            step.nmi_pairs.append((assign, human, kept))  # selected at logging time, on the host
    entry = {"step": step_number, "alpha": alpha, "kept": kept, "assign": assign, "human": human,
             "decision": decision, "per_micro_batch": per_micro_batch, "ess": metrics["ess"]}
    step.reset_samples()
    return metrics, entry


class StepAccumulator:
    """The micro-batches of the current optimizer step (tensors), and the NMI pairs since the last log."""

    def __init__(self):
        self.nmi_pairs: list = []
        self.finite_flags: list[bool] = []
        self.reset_samples()

    def reset_samples(self) -> None:
        self.alphas, self.shares, self.kepts, self.losses, self.assignments, self.humans = [], [], [], [], [], []
        self.last_decision = None
        self.dropped = 0

    def add_finite(self, usable: bool) -> None:
        """Whether the micro-batch had a usable sample (read once per micro-batch by the trainer)."""
        self.finite_flags.append(bool(usable))

    def any_finite(self) -> bool:
        """Whether any sample of the optimizer step (all ranks) was usable; resets the flags."""
        flags, self.finite_flags = self.finite_flags, []
        if not flags:
            return True
        mine = any(flags)
        if is_distributed():  # every rank must take the same decision
            return bool(gather_rows(torch.tensor([float(mine)]))[0].sum() > 0)
        return mine

    def add(self, *, alpha, shares, kept, losses, assignments, human, dropped, decision) -> None:
        self.alphas.append(alpha)
        self.shares.append(torch.where(kept, shares, torch.zeros_like(shares)))
        self.kepts.append(kept)
        self.losses.append(losses)
        self.assignments.append(assignments)
        if human is not None:
            self.humans.append(human)
        self.dropped += dropped
        self.last_decision = decision

    def take_nmi(self) -> float | None:
        if not self.nmi_pairs:
            return None
        from .domains import normalized_mutual_information

        kept = torch.cat([k for _, _, k in self.nmi_pairs]).cpu()
        model = torch.cat([a for a, _, _ in self.nmi_pairs]).cpu()[kept]
        human = torch.cat([h for _, h, _ in self.nmi_pairs]).cpu()[kept]
        self.nmi_pairs = []
        return normalized_mutual_information(model, human) if model.numel() else None


def history_entry(e: dict) -> dict:
    """A pending history entry (tensors) as JSON-able numbers: what the plots and the card read."""
    decision = e["decision"]
    entry = {"step": e["step"]}
    if decision is not None and decision.domain_weights is not None:
        entry["domain_weights"] = [round(float(x), 6) for x in decision.domain_weights.tolist()]
        if decision.cluster_sizes is not None:
            entry["cluster_sizes"] = [int(round(float(x))) for x in decision.cluster_sizes.tolist()]
        freq = (decision.extra or {}).get("frequencies")
        if freq is not None:
            entry["domain_frequencies"] = [round(float(x), 6) for x in freq.tolist()]
        entry["persistent"] = not e["per_micro_batch"]
    else:
        entry["domain_weights"] = [1.0]
        entry["cluster_sizes"] = [int(e["kept"].sum())]
    if decision is not None and decision.warmup:
        entry["warmup"] = True
    alpha, kept = e["alpha"], e["kept"]
    entry["ess"] = round(float(e["ess"]), 6)
    human = e["human"]
    if human is not None and bool(kept.any()):
        h, a = human[kept].cpu(), alpha[kept].cpu()
        a = a / a.sum() if float(a.sum()) > 0 else a
        labels = torch.unique(h)
        entry["human_mass"] = {str(int(d)): round(float(a[h == d].sum()), 6) for d in labels}
        entry["human_share"] = {str(int(d)): round(float((h == d).double().mean()), 6) for d in labels}
        assign = e["assign"][kept].cpu()
        if decision is not None and decision.cluster_sizes is not None and bool((assign >= 0).all()):
            from .domains import normalized_mutual_information

            entry["nmi"] = round(normalized_mutual_information(assign, h), 6)
    return entry


