"""Sample-weighting baselines that run in the same trainer as DoGraph (`mixing_strategy`).

Each returns per-sample weights α (B,) with Σ α = 1; the step then uses the gradient of Σ_i α_i ℓ_i,
exactly as DoGraph does with its domain weights. Uniform α = 1/B is the ordinary mean loss.

- `loss_reweighting_weights`: dynamic loss-based sample reweighting (Sow et al., ICLR 2025), our reading.
- `GroupDRO`: online robust weights over the HUMAN domain labels with exponentiated-gradient updates
  (DoReMi's inner loop without its reference model).

The weights are constants of the step: losses are detached, no gradient flows through α.
"""

from __future__ import annotations

import math

import torch


# Relative floor of loss_reweighting's normalizing std (see there).
STD_FLOOR = 1e-4


def _weights_dtype(losses: torch.Tensor) -> torch.dtype:
    # Keep float32/float64 as the losses have them; half-precision losses get float32 weights, so that
    # weights like 1/B do not lose digits.
    return losses.dtype if losses.dtype in (torch.float32, torch.float64) else torch.float32


def loss_reweighting_weights(losses: torch.Tensor, temperature: float) -> torch.Tensor:
    """Per-sample weights α = softmax(u / temperature) of the batch-normalized losses.

    u_i = (ℓ_i − mean ℓ) / s, s = max(std ℓ, 1e-4 · (1 + |mean ℓ|)), std the population standard
    deviation; when all losses are equal u = 0 exactly, hence α = 1/B. The floor keeps losses that differ
    only by float rounding (std ~1e-7) from being blown up to u = ±1: they get (near) uniform weights; real
    batches have std far above it. Higher-loss samples weigh more, the more so the lower the temperature.
    Returns (B,) on the losses' device, summing to 1.
    """
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    ell = losses.detach().reshape(-1).to(torch.float64)
    if ell.numel() == 0:
        raise ValueError("loss_reweighting_weights needs at least one loss")
    if bool((ell == ell[0]).all()):
        # Rounding in the mean would otherwise leave u ≈ ±1e-9 instead of 0.
        u = torch.zeros_like(ell)
    else:
        mean = ell.mean()
        scale = torch.clamp(ell.std(correction=0), min=STD_FLOOR * (1 + float(mean.abs())))
        u = (ell - mean) / scale
    alpha = torch.softmax(u / temperature, dim=0)
    return alpha.to(_weights_dtype(losses))


class GroupDRO:
    """Online group-DRO weights q over human domain labels, updated by exponentiated gradient.

    State: log q over `num_groups` groups (uniform at the start). The number of groups grows when a
    batch brings a new label id; a new group starts at the uniform share 1/G (G counting it), the others
    keeping their relative weights. Each `update` takes the batch's per-sample losses and labels and
    returns the sample weights α for that batch.
    """

    def __init__(self, step_size: float, num_groups: int = 0):
        if not step_size > 0:
            raise ValueError(f"step_size={step_size} must be > 0")
        if num_groups < 0:
            raise ValueError(f"num_groups={num_groups} must be >= 0")
        self.step_size = float(step_size)
        # Log-weights, so that exp(η L_g) never overflows however many steps accumulate.
        self.log_weights = torch.full((int(num_groups),), -math.log(num_groups) if num_groups else 0.0,
                                      dtype=torch.float64)

    @property
    def num_groups(self) -> int:
        return int(self.log_weights.numel())

    @property
    def weights(self) -> torch.Tensor:
        """q, the current group weights (float64, summing to 1)."""
        return torch.softmax(self.log_weights, dim=0)

    def _grow(self, num_groups: int) -> None:
        old = self.num_groups
        if num_groups <= old:
            return
        share = 1.0 / num_groups
        new = torch.full((num_groups,), math.log(share), dtype=torch.float64)
        if old:
            # Existing groups share the remaining (1 − (G − G_old)/G) in their current proportions.
            kept = 1.0 - (num_groups - old) * share
            new[:old] = torch.log_softmax(self.log_weights, dim=0) + math.log(kept)
        self.log_weights = new

    def update(self, losses: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
        """One exponentiated-gradient step on the batch, then the batch's sample weights.

        L_g = mean loss of group g in the batch (groups present only); q_g ← q_g·exp(η L_g) for those
        groups, then q is renormalized over all groups. α_i = q_{g(i)} / n_{g(i)}, renormalized over the
        groups present in the batch, so that Σ α = 1 (one group: α = 1/B). Returns (B,) on the losses'
        device.
        """
        ell = losses.detach().reshape(-1).to("cpu", torch.float64)
        g = groups.detach().reshape(-1).to("cpu", torch.long)
        if ell.numel() == 0 or ell.shape != g.shape:
            raise ValueError(f"need as many group labels as losses (got {g.numel()} and {ell.numel()}), at least one")
        if bool((g < 0).any()):
            raise ValueError("group labels must be non-negative integers")
        self._grow(int(g.max()) + 1)
        counts = torch.bincount(g, minlength=self.num_groups).to(torch.float64)
        sums = torch.zeros(self.num_groups, dtype=torch.float64).index_add_(0, g, ell)
        present = counts > 0
        group_loss = torch.where(present, sums / counts.clamp(min=1), torch.zeros_like(sums))
        self.log_weights = torch.log_softmax(self.log_weights + self.step_size * group_loss, dim=0)
        q = torch.softmax(self.log_weights, dim=0)
        per_sample = q[g] / counts[g]
        alpha = per_sample / per_sample.sum()
        return alpha.to(device=losses.device, dtype=_weights_dtype(losses))

    def state_dict(self) -> dict:
        """JSON-serializable state: the step size and the log-weights (a list of floats)."""
        return {"step_size": self.step_size, "log_weights": [float(x) for x in self.log_weights.tolist()]}

    def load_state_dict(self, state: dict) -> None:
        self.step_size = float(state.get("step_size", self.step_size))
        self.log_weights = torch.tensor([float(x) for x in state["log_weights"]], dtype=torch.float64)
