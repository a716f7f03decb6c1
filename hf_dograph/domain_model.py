"""Model-perceived domains that persist across steps (`domain_mode="persistent"`, the default).

The paper's step clusters each micro-batch afresh. With 8–48 sketches per batch that gives clusters of 1–5
samples whose variances are noise, and weights that jump between 0 and 0.9 from step to step (measured:
docs/METHOD_NOTES.md). Here the domains are a model kept across steps:

* **Window.** The sketches of the last `domain_window` samples (all ranks, in a canonical order) with their
  losses and item counts, in a fixed-capacity ring buffer on the model's device.
* **Domains.** K-means (`kmeans.py`, on the device) on the window: k-means++ seedings for the first fit, then
  every `domain_refit_steps` optimizer steps a refit that starts from the current centroids (Lloyd, empty
  clusters re-seeded), so that domain j keeps its identity and a refit costs one K-means run.
* **Statistics.** Every optimizer step each domain's size, frequency (its share of the items), mean sketch,
  variance σ² and mean loss are recomputed from its ~W/m samples in the window; σ² is shrunk toward the
  pooled within-domain variance, (ν_j σ²_j + κ σ²_pool)/(ν_j + κ). Centroids change only at refits, so each
  window row's domain and its squared distance to that centroid are computed once, when the row arrives (and
  for the whole window at a refit); σ² then follows from them without another pass over the window's
  sketches: Σ_{i∈j} ‖z_i − μ_j‖² = Σ_{i∈j} ‖z_i − c_j‖² − n_j ‖μ_j − c_j‖² (μ_j the mean, c_j the centroid,
  refitted every `domain_refit_steps`, so the second term stays small against the first; tested against the
  direct computation, including rows that drifted 30 spreads away from their centroid).
* **Weights.** The objective gives w on the simplex from these statistics (the default `uncertainty`
  without graph term in closed form on the device, the others with the exact host solvers of
  `objectives.py`); w is then smoothed over time, w ← (1-β)w + β w_new, starting from uniform.
* **Sample weights.** A sample's weight is v_i = r_{d(i)} / Σ_j f_j r_j, with d(i) its nearest centroid,
  f_j the domain frequencies and r_j = w_j ('sample' mapping) or w_j / f_j ('domain' mapping: the domain's
  share is then w_j, as in the paper's α_i = w_j / n_j). So E[v] = 1 under the recent data: the step has,
  on average, the Trainer's total weight, and a sample's weight depends only on its own sketch and on the
  model as it stood when the optimizer step began — the same whatever the split of the step into
  micro-batches and ranks.

Until `domain_warmup_samples` samples have been seen every v_i = 1 (the Trainer's step exactly).
All per-step work is tensor ops on the device: no device→host synchronization, except for objectives
other than closed-form `uncertainty` (one copy of the m × k statistics per step).
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from .kmeans import kmeans, nearest, refine
from .tensors import group_sums

logger = logging.getLogger(__name__)

_ORDER_STREAM = 0x5EED  # seeds the canonical-order direction apart from everything else


def canonical_order(z: torch.Tensor, seed: int, direction: torch.Tensor | None = None) -> torch.Tensor:
    """A row order that depends only on the rows' values (sorted along a fixed random direction), so that a
    step's samples enter the window in the same order however the step was split across micro-batches and
    ranks. Ties (identical rows) are interchangeable. `direction`: `order_direction(...)` made once (its copy
    to the device would otherwise wait for the device every step)."""
    if direction is None:
        direction = order_direction(z.shape[1], seed, z.device)
    key = z.double() @ direction
    return torch.argsort(key, stable=True)


def order_direction(dim: int, seed: int, device: torch.device) -> torch.Tensor:
    """The fixed random direction of `canonical_order` (float64, drawn on the CPU: the same on every device)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + _ORDER_STREAM)
    return torch.randn(dim, generator=gen, dtype=torch.float64).to(device)


class PersistentDomains:
    """The domain model: window, centroids, statistics, smoothed weights (see the module docstring).

    Args:
        settings: the `DoGraphSettings` (num_domains, domain_window, refit steps, warm-up, shrinkage, smoothing,
            mapping, objective, K-means effort, projection_seed).
        solve: `f(DomainStats) -> weights (m',)` on the simplex for the objectives solved on the host
            (`objectives.solve_domain_weights` with the settings bound); the closed-form default does not use it.
    """

    def __init__(self, settings, solve: Callable | None = None):
        self.settings = settings
        self.m = int(settings.num_domains)
        self.capacity = int(settings.domain_window)
        self.solve = solve
        # The window (allocated on first use, on the sketches' device)
        self.z: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.items: torch.Tensor | None = None
        self.valid: torch.Tensor | None = None
        # Per window row, under the current centroids: its domain and ‖z_i − c_domain‖² (see the docstring)
        self.domain: torch.Tensor | None = None
        self.spread: torch.Tensor | None = None
        self.ptr = 0
        self.filled = 0
        # Counters (host ints: they never need the device)
        self.samples_seen = 0
        self.steps = 0
        self.refits = 0
        self.last_refit_step: int | None = None
        # The model
        self.centroids: torch.Tensor | None = None
        self.weights: torch.Tensor | None = None  # smoothed w on the simplex (m,)
        self.multipliers: torch.Tensor | None = None  # v per domain (m,)
        self.stats: dict[str, torch.Tensor] = {}
        self._pending: list[tuple[torch.Tensor, ...]] = []
        self._order_direction: torch.Tensor | None = None  # canonical_order's, made once on the sketches' device

    # ------------------------------------------------------------------ during the optimizer step
    @property
    def active(self) -> bool:
        """Whether the warm-up is over (domains fitted, weights in use)."""
        return self.multipliers is not None

    def assign(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest domain of each sketch (S,) under the current centroids (-1 during warm-up)."""
        if self.centroids is None:
            return torch.full((z.shape[0],), -1, dtype=torch.long, device=z.device)
        return nearest(z.float(), self.centroids.to(z.device))

    def sample_weights(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v (S,), domain (S,)): each sample's weight multiplier and nearest domain; v ≡ 1 during warm-up."""
        assign = self.assign(z)
        if not self.active:
            return torch.ones(z.shape[0], dtype=torch.float32, device=z.device), assign
        return self.multipliers.to(z.device)[assign], assign

    def observe(self, z: torch.Tensor, losses: torch.Tensor, items: torch.Tensor, valid: torch.Tensor) -> None:
        """Keep a micro-batch's sketches for the update at the end of the optimizer step."""
        self._pending.append((z.detach().float(), losses.detach().float(), items.detach().float(),
                              valid.detach().float()))

    # ------------------------------------------------------------------ between optimizer steps
    def end_step(self, gather: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Add the step's samples (from every rank: `gather` concatenates the processes' rows) to the window,
        refit on schedule, and recompute the statistics and weights for the next step."""
        if not self._pending:
            return
        rows = [torch.cat(parts) for parts in zip(*self._pending)]
        self._pending = []
        packed = torch.cat([rows[0], torch.stack(rows[1:], dim=1)], dim=1)  # (n, k + 3)
        if gather is not None:
            packed = gather(packed)
        d = self._order_direction
        if d is None or d.shape[0] != packed.shape[1] or d.device != packed.device:
            d = self._order_direction = order_direction(packed.shape[1], self.settings.projection_seed, packed.device)
        packed = packed[canonical_order(packed, self.settings.projection_seed, d)]
        self._insert(packed)
        self.samples_seen += int(packed.shape[0])
        self.steps += 1
        s = self.settings
        due = self.centroids is None and self.samples_seen >= s.domain_warmup_samples
        due = due or (self.centroids is not None and self.steps - self.last_refit_step >= s.refit_steps)
        if due:
            self._refit()
        if self.centroids is not None:
            self._update()

    def _insert(self, packed: torch.Tensor) -> None:
        k = packed.shape[1] - 3
        if self.z is None:
            dev = packed.device
            self.z = torch.zeros(self.capacity, k, device=dev)
            self.loss = torch.zeros(self.capacity, device=dev)
            self.items = torch.zeros(self.capacity, device=dev)
            self.valid = torch.zeros(self.capacity, device=dev)
            self.domain = torch.zeros(self.capacity, dtype=torch.long, device=dev)
            self.spread = torch.zeros(self.capacity, dtype=torch.float64, device=dev)
        if k != self.z.shape[1]:
            raise ValueError(f"sketches of dimension {k} reached a domain model of dimension {self.z.shape[1]}")
        packed = packed[-self.capacity:]  # more rows than the window holds: keep the last (canonical) ones
        n = packed.shape[0]
        # The ring's rows ptr, ptr + 1, ...: at most two slices (host ints: copies, no index tensors)
        head = min(n, self.capacity - self.ptr)
        for rows, src in ((slice(self.ptr, self.ptr + head), packed[:head]), (slice(0, n - head), packed[head:])):
            if src.shape[0] == 0:
                continue
            self.z[rows] = src[:, :k]
            self.loss[rows] = src[:, k]
            self.items[rows] = src[:, k + 1]
            self.valid[rows] = src[:, k + 2]
            if self.centroids is not None:
                self._assign_rows(rows)
        self.ptr = (self.ptr + n) % self.capacity
        self.filled = min(self.capacity, self.filled + n)

    def _refit(self) -> None:
        s = self.settings
        if self.centroids is None or self.centroids.shape[0] != self.m:
            # The first fit: k-means++ seedings, the best of `kmeans_n_init` kept.
            gen = torch.Generator(device=self.z.device).manual_seed(int(s.projection_seed) * 7919 + self.refits)
            self.centroids, _ = kmeans(self.z, self.valid, self.m, n_init=int(s.kmeans_n_init),
                                       iters=int(s.kmeans_max_iter), generator=gen)
        else:
            # Later refits start from the current centroids: domain j stays domain j (its weight history and
            # smoothing stay meaningful), and the refit costs one K-means run.
            self.centroids = refine(self.z, self.valid, self.centroids, int(s.kmeans_max_iter))
        self.refits += 1
        self.last_refit_step = self.steps
        self._assign_rows(slice(None))

    def _assign_rows(self, idx) -> None:
        """Domain and squared distance to its centroid of the window rows `idx` (new rows, or all at a refit)."""
        z = self.z[idx]
        domain = nearest(z, self.centroids)
        self.domain[idx] = domain
        self.spread[idx] = ((z - self.centroids[domain]) ** 2).sum(1, dtype=torch.float64)

    def _update(self) -> None:
        """Statistics of every domain from the window, the objective's weights, smoothing, multipliers."""
        s = self.settings
        z, valid = self.z, self.valid
        # Each window row's domain, -1 for the rows left out (valid is 0 or 1: a kept sample or not); every sum
        # below is over a domain's rows.
        member = torch.where(valid > 0, self.domain, -1)
        counts, item_mass, loss_sums = group_sums(torch.stack((valid, self.items, self.loss), dim=1), member,
                                                  self.m).unbind(1)
        freq = item_mass / item_mass.sum().clamp(min=1e-30)
        means = group_sums(z, member, self.m) / counts.clamp(min=1)[:, None]
        # Σ_{i∈j} ‖z_i − μ_j‖², from the rows' distances to their centroid (see the module docstring)
        # (accumulated in float64; the two terms differ by n_j σ², so float32 rounding of the distances and the
        # mean, ~1e-7 of D² = ‖μ_j − c_j‖², is an error of ~3e-7·D²/σ² relative — 2.7e-4 measured for rows 30
        # spreads from their centroid — negligible unless they drift far further, which refits prevent)
        offset = ((means.double() - self.centroids.double()) ** 2).sum(1)
        spread_sums = group_sums(self.spread[:, None], member, self.m)[:, 0]
        ss = (spread_sums - counts.double() * offset).clamp(min=0).to(z.dtype)
        nu = (counts - 1).clamp(min=0)
        pooled = ss.sum() / nu.sum().clamp(min=1)
        kappa = float(s.variance_shrinkage)
        shrunk = (ss + kappa * pooled) / (nu + kappa).clamp(min=1e-30)
        sigma2 = torch.where(nu + kappa > 0, shrunk, pooled.expand_as(shrunk))
        losses = loss_sums / counts.clamp(min=1)
        present = counts > 0
        self.stats = {"counts": counts, "freq": freq, "sigma2": sigma2, "losses": losses, "centroids": means}

        w_new = self._solve(present, counts, means, sigma2, losses, z, valid)
        if self.weights is None:  # start from uniform: the weights then move smoothly away from the Trainer's
            self.weights = torch.full_like(w_new, 1.0 / self.m)
        beta = float(s.weight_smoothing)
        self.weights = (1 - beta) * self.weights + beta * w_new
        w = self.weights
        if s.mapping == "sample":
            r = w
            meaningful = (freq > 0) | (w > 0)
        else:
            r = torch.where(freq > 0, w / freq.clamp(min=1e-30), torch.zeros_like(w))
            meaningful = freq > 0
        v = r / (freq * r).sum().clamp(min=1e-30)
        # A domain with no recent samples (and, for 'sample', no weight) says nothing: its new samples keep v = 1.
        self.multipliers = torch.where(meaningful, v, torch.ones_like(v))

    def _solve(self, present, counts, means, sigma2, losses, z, valid) -> torch.Tensor:
        """The objective's weights (m,) on the simplex. Domains with no sample in the window get the mean weight
        of those present: nothing is known of them, and a weight of 0 would silence the samples that reach them
        before the next refit (measured: a rare human domain's weight fell to 0.15× uniform that way)."""
        return self._neutral_for_absent(self._solve_present(present, counts, means, sigma2, losses, z, valid), present)

    @staticmethod
    def _neutral_for_absent(w: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        mean_present = (w * present).sum() / present.sum().clamp(min=1)
        w = torch.where(present, w, mean_present.expand_as(w))
        return w / w.sum().clamp(min=1e-30)

    def _solve_present(self, present, counts, means, sigma2, losses, z, valid) -> torch.Tensor:
        """The objective's weights over the domains present (0 elsewhere), summing to 1."""
        s = self.settings
        from .objectives import OBJECTIVE_SOLVERS, solve_uncertainty

        closed_form = (s.objective == "uncertainty" and s.graph_lambda == 0
                       and OBJECTIVE_SOLVERS.get("uncertainty") is solve_uncertainty)
        if closed_form:
            # w_j ∝ 1/(σ²_j + ε), ε = uncertainty_eps × mean σ² over the domains present (objectives.py's rule).
            mean_s2 = (sigma2 * present).sum() / present.sum().clamp(min=1)
            eps = torch.where(mean_s2 > 0, s.uncertainty_eps * mean_s2, torch.full_like(mean_s2, s.uncertainty_eps))
            inv = torch.where(present, 1.0 / (sigma2 + eps), torch.zeros_like(sigma2))
            w = inv / inv.sum().clamp(min=1e-30)
            if s.uniform_mix > 0:
                w = (1 - s.uniform_mix) * w + s.uniform_mix * present.to(w.dtype) / present.sum().clamp(min=1)
            return w
        from .domains import DomainStats

        # Host solve: one copy of the statistics of the domains present.
        idx = present.nonzero().flatten()
        stats = DomainStats(
            sizes=counts[idx].round().long().cpu(),
            centroids=means[idx].double().cpu(),
            sigma2=sigma2[idx].double().cpu(),
            losses=losses[idx].double().cpu(),
            mean_sketch=((z * valid[:, None]).sum(0) / valid.sum().clamp(min=1)).double().cpu(),
        )
        w_present = self.solve(stats).to(device=z.device, dtype=z.dtype)
        return torch.zeros(self.m, device=z.device, dtype=z.dtype).index_copy(0, idx, w_present)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> tuple[dict, dict[str, torch.Tensor]]:
        """(JSON-able counters and settings, tensors): everything needed to continue exactly."""
        meta = {
            "ptr": self.ptr, "filled": self.filled, "samples_seen": self.samples_seen, "steps": self.steps,
            "refits": self.refits, "last_refit_step": self.last_refit_step, "num_domains": self.m,
            "capacity": self.capacity,
        }
        tensors = {}
        for name in ("z", "loss", "items", "valid", "domain", "spread", "centroids", "weights", "multipliers"):
            t = getattr(self, name)
            if t is not None:
                tensors[name] = t.detach().cpu().contiguous()
        for name, t in self.stats.items():
            tensors[f"stats.{name}"] = t.detach().cpu().contiguous()
        return meta, tensors

    def load_state_dict(self, meta: dict, tensors: dict[str, torch.Tensor], device=None) -> None:
        for name in ("ptr", "filled", "samples_seen", "steps", "refits", "last_refit_step"):
            setattr(self, name, meta.get(name, getattr(self, name)))
        if "z" in tensors:
            self.capacity = int(tensors["z"].shape[0])
        for name in ("z", "loss", "items", "valid", "domain", "spread", "centroids", "weights", "multipliers"):
            t = tensors.get(name)
            setattr(self, name, None if t is None else t.to(device) if device is not None else t)
        if self.z is not None and self.domain is None:  # a checkpoint from before the rows' domains were kept
            self.domain = torch.zeros(self.capacity, dtype=torch.long, device=self.z.device)
            self.spread = torch.zeros(self.capacity, dtype=torch.float64, device=self.z.device)
            if self.centroids is not None:
                self._assign_rows(slice(None))
        self.stats = {k[len("stats."):]: (v.to(device) if device is not None else v)
                      for k, v in tensors.items() if k.startswith("stats.")}
        self._pending = []

    def reset(self) -> None:
        """Forget everything (a new warm-up)."""
        self.__init__(self.settings, self.solve)
