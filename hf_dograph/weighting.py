"""Per-sample weight multipliers v_i, one strategy per `mixing_strategy` / `domain_mode`.

The trainer back-propagates Σ_i v_i μ_i ℓ_i, μ_i being sample i's share of the Trainer's own loss
(`trainer_objective.py`). A strategy only decides v (0 for a sample left out):

- `uniform`: v ≡ 1 — the plain `Trainer` step.
- `dograph`, persistent domains (default): v from the domain model of `domain_model.py`, as it stood when
  the optimizer step began; its update runs between optimizer steps (`end_step`).
- `dograph`, `domain_mode="per_batch"`: the paper read literally — K-means on the micro-batch (gathered
  over ranks), weights on the simplex, α_i = w_j / n_j (or ∝ w_j with `weight_mapping="sample"`), v = n·α.
- `loss_reweighting`, `group_dro`: the baselines of `strategies.py`, per micro-batch, v = n·α.

Per-micro-batch strategies rescale α (Σ α = 1 over the micro-batch) to v = n·α so that uniform α gives
v ≡ 1, the Trainer's step; the persistent model's v has mean 1 over recent data by construction.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .distributed import gather_rows

logger = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    """What a strategy sees of one micro-batch on this process (all (S,), detached)."""

    losses: torch.Tensor  # ℓ_i
    items: torch.Tensor  # items of sample i (its share's numerator)
    kept: torch.Tensor  # bool: finite loss and gradient, at least one item
    sketches: torch.Tensor | None = None  # (S, k) z_i, for the strategies that need them
    human: torch.Tensor | None = None  # human domain labels, if the batch has them


@dataclass
class SampleWeights:
    """A strategy's decision for one micro-batch (this process's samples)."""

    multipliers: torch.Tensor  # (S,) float32 v_i, 0 where not kept
    assignments: torch.Tensor  # (S,) long model domain of each sample, -1 where none
    domain_weights: torch.Tensor | None = None  # (m,) w on the simplex, if the strategy has domains
    cluster_sizes: torch.Tensor | None = None  # (m,)
    sigma2: torch.Tensor | None = None  # (m,)
    domain_losses: torch.Tensor | None = None  # (m,)
    objective_value: torch.Tensor | None = None
    warmup: bool = False
    extra: dict = field(default_factory=dict)


class Strategy:
    """Base class: `weights` per micro-batch, `end_step` between optimizer steps, a checkpointable state."""

    needs_sketches = False
    per_micro_batch_history = False  # the history gets one entry per micro-batch (else per optimizer step)

    def weights(self, batch: MicroBatch) -> SampleWeights:
        raise NotImplementedError

    def end_step(self) -> None:
        """Called once per optimizer step, after its last micro-batch, on every rank."""

    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        return {}, {}

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor], device=None) -> None:
        pass


class Uniform(Strategy):
    """v ≡ 1: the Trainer's own step."""

    def weights(self, batch: MicroBatch) -> SampleWeights:
        kept = batch.kept
        return SampleWeights(multipliers=kept.float(), assignments=torch.where(kept, 0, -1))


class PersistentDoGraph(Strategy):
    """DoGraph with the persistent domain model (the default)."""

    needs_sketches = True

    def __init__(self, settings, solve):
        from .domain_model import PersistentDomains

        self.model = PersistentDomains(settings, solve)

    def weights(self, batch: MicroBatch) -> SampleWeights:
        dm = self.model
        v, assign = dm.sample_weights(batch.sketches)
        kept = batch.kept
        dm.observe(batch.sketches, batch.losses, batch.items, kept)
        out = SampleWeights(multipliers=torch.where(kept, v, torch.zeros_like(v)),
                            assignments=torch.where(kept, assign, torch.full_like(assign, -1)),
                            warmup=not dm.active)
        if dm.active:
            out.domain_weights = dm.weights
            out.cluster_sizes = dm.stats.get("counts")
            out.sigma2 = dm.stats.get("sigma2")
            out.domain_losses = dm.stats.get("losses")
            out.extra = {"centroids": dm.centroids, "frequencies": dm.stats.get("freq")}
        return out

    def end_step(self) -> None:
        self.model.end_step(gather=lambda t: gather_rows(t)[0])

    def state_dict(self):
        return self.model.state_dict()

    def load_state_dict(self, meta, tensors, device=None):
        self.model.load_state_dict(meta, tensors, device=device)


class _PerMicroBatch(Strategy):
    """Strategies that weigh the (rank-gathered) micro-batch on its own: α over the kept samples, Σ α = 1."""

    per_micro_batch_history = True

    def weights(self, batch: MicroBatch) -> SampleWeights:
        losses, mine = gather_rows(batch.losses.float())
        kept = gather_rows(batch.kept)[0].cpu()
        human = None if batch.human is None else gather_rows(batch.human.to(batch.losses.device).long())[0].cpu()
        sketches = None if batch.sketches is None else gather_rows(batch.sketches)[0]
        idx = kept.nonzero().flatten()
        n = len(idx)
        v = torch.zeros(len(kept), dtype=torch.float64)
        assignments = torch.full((len(kept),), -1, dtype=torch.long)
        out = SampleWeights(multipliers=v, assignments=assignments)
        if n:
            alpha, assign = self.alpha(losses.cpu()[idx], None if human is None else human[idx],
                                       None if sketches is None else sketches[idx].cpu(), out)
            v[idx] = alpha.double() * n
            assignments[idx] = assign
        device = batch.losses.device
        out.multipliers = v[mine].to(device=device, dtype=torch.float32)
        out.assignments = assignments[mine].to(device)
        return out

    def alpha(self, losses, human, sketches, out: SampleWeights) -> tuple[torch.Tensor, torch.Tensor]:
        """(α over the kept samples, their model domain) — and fill `out`'s domain fields."""
        raise NotImplementedError


class PerBatchDoGraph(_PerMicroBatch):
    """The paper read literally: K-means on each micro-batch, weights on its domains, α_i = w_j / n_j."""

    needs_sketches = True

    def __init__(self, settings, solve):
        from .domains import DomainFinder

        self.settings = settings
        self.solve = solve
        self.finder = DomainFinder(settings.num_domains, seed=settings.projection_seed, n_init=settings.kmeans_n_init,
                                   max_iter=settings.kmeans_max_iter)
        self.step_key = (None, 0)

    def set_step(self, global_step: int) -> None:
        gs, i = self.step_key
        self.step_key = (global_step, i + 1 if gs == global_step else 0)

    def alpha(self, losses, human, sketches, out):
        from .domains import domain_statistics

        step, micro = self.step_key
        assign = self.finder.assign(sketches, step=step or 0, micro=micro)
        stats = domain_statistics(sketches, losses, assign)
        result = self.solve(stats)
        w = result.weights.double()
        if self.settings.mapping == "domain":
            alpha = w[assign] / stats.sizes[assign].double()
        else:
            alpha = w[assign] / w[assign].sum()
        out.domain_weights, out.cluster_sizes, out.sigma2 = w, stats.sizes, stats.sigma2
        out.domain_losses = stats.losses
        out.objective_value = torch.tensor(float(result.value))
        out.extra = {"centroids": stats.centroids}
        return alpha, assign

    def state_dict(self):
        return {"finder": self.finder.state_dict(), "step_key": list(self.step_key)}, {}

    def load_state_dict(self, meta, tensors, device=None):
        self.finder.load_state_dict(meta.get("finder") or {})
        gs, i = meta.get("step_key") or [None, 0]
        self.step_key = (gs, int(i))


class LossReweighting(_PerMicroBatch):
    """Baseline: softmax of the micro-batch's normalized losses (strategies.loss_reweighting_weights)."""

    def __init__(self, temperature: float):
        self.temperature = float(temperature)

    def alpha(self, losses, human, sketches, out):
        from .strategies import loss_reweighting_weights

        return loss_reweighting_weights(losses, self.temperature), torch.zeros(len(losses), dtype=torch.long)


class GroupDROWeights(_PerMicroBatch):
    """Baseline: online group DRO over the human domain labels (strategies.GroupDRO)."""

    def __init__(self, step_size: float, label_column: str):
        from .strategies import GroupDRO

        self.dro = GroupDRO(step_size=step_size)
        self.label_column = label_column

    def alpha(self, losses, human, sketches, out):
        if human is None:
            raise ValueError(
                f"mixing_strategy='group_dro' weights human domains, but the batch has no {self.label_column!r} "
                "column: use a domain-labelled dataset (hf_dograph.data) or set domain_label_column to the column "
                "that holds the labels."
            )
        alpha = self.dro.update(losses, human)
        out.domain_weights = self.dro.weights
        return alpha, human.clone()

    def state_dict(self):
        return {"group_dro": self.dro.state_dict()}, {}

    def load_state_dict(self, meta, tensors, device=None):
        if meta.get("group_dro"):
            self.dro.load_state_dict(meta["group_dro"])


def build_strategy(settings) -> Strategy:
    """The strategy for `settings` (a validated `DoGraphSettings`)."""
    s = settings
    if s.mixing_strategy == "uniform":
        return Uniform()
    if s.mixing_strategy == "loss_reweighting":
        return LossReweighting(s.loss_reweighting_temperature)
    if s.mixing_strategy == "group_dro":
        return GroupDROWeights(s.group_dro_step_size, s.domain_label_column)
    from .objectives import ObjectiveParams, solve_domain_weights

    def solve(stats):
        return solve_domain_weights(stats, ObjectiveParams.from_settings(s))

    if s.domain_mode == "per_batch":
        return PerBatchDoGraph(s, solve)
    return PersistentDoGraph(s, lambda stats: solve(stats).weights)
