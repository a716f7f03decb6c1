"""K-means in torch, on the sketches' device, without a device→host synchronization.

The persistent domain model refits its centroids every few optimizer steps on a window of a few hundred
sketches. scikit-learn would need the sketches on the host (a copy and a synchronization per refit on a GPU)
and stops at convergence (a data-dependent loop). Here everything is tensor ops with a fixed amount of work on a
device:

* k-means++ seeding with the sampling done by the Gumbel-max trick (argmax of log-weight + Gumbel noise is a
  draw from the normalized weights), so no `multinomial` and no host-side branching;
* `n_init` seedings run together as a batch; a fixed number of Lloyd iterations; an empty cluster keeps its
  previous centroid; the restart with the least inertia is kept (argmin on the device).

On the CPU there is no device to wait for, so there the loops stop as soon as their remaining iterations can
change nothing: Lloyd once an iteration's assignments equal the previous one's (the centroids are then a fixed
point: the same means of the same rows, bit for bit), and the re-seeding of empty clusters visits only the
clusters that are empty. The result is identical to running every iteration (tested); a warm-started refit
then costs a few iterations instead of `kmeans_max_iter`.

Rows carry weights (0 for padding / left-out rows), so a fixed-capacity window can be clustered as it is.
The result depends only on the rows in their given order and on the generator: the caller keeps a canonical
row order (see `domain_model.canonical_order`).
"""

from __future__ import annotations

import torch

from .tensors import one_hot


def _centroid_terms(x: torch.Tensor, centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(‖c_j‖² (..., m), ⟨x_i, c_j⟩ (..., N, m)): the parts of ‖x_i − c_j‖² that involve the centroids."""
    c2 = (centroids * centroids).sum(-1)
    cross = torch.matmul(centroids, x.T).transpose(-1, -2)
    return c2, cross


def squared_distances(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """‖x_i − c_j‖² for rows x (N, k) and centroids (..., m, k) → (..., N, m), clamped at 0."""
    x2 = (x * x).sum(-1)
    c2, cross = _centroid_terms(x, centroids)
    return (x2[..., :, None] - 2.0 * cross + c2[..., None, :]).clamp_(min=0.0)


def nearest(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid of each row, (..., N): argmin_j ‖c_j‖² − 2⟨x, c_j⟩ — the squared distance
    without the row's own ‖x‖², which does not change the argmin and would cost a pass over x."""
    c2, cross = _centroid_terms(x, centroids)
    return (c2[..., None, :] - 2.0 * cross).argmin(dim=-1)


def _gumbel_argmax(log_weights: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A draw from softmax(log_weights) along the last axis (one per leading index)."""
    u = torch.rand(log_weights.shape, generator=generator, device=log_weights.device, dtype=log_weights.dtype)
    gumbel = -torch.log(-torch.log(u.clamp(min=1e-20, max=1.0 - 1e-7)))
    return (log_weights + gumbel).argmax(dim=-1)


def kmeans_plus_plus(x: torch.Tensor, weights: torch.Tensor, m: int, n_init: int,
                     generator: torch.Generator) -> torch.Tensor:
    """`n_init` k-means++ seedings of m centroids each, (n_init, m, k), rows drawn ∝ weight · D²."""
    n = x.shape[0]
    log_w = torch.where(weights > 0, weights.clamp(min=1e-30).log(), torch.full_like(weights, -float("inf")))
    first = _gumbel_argmax(log_w.expand(n_init, n), generator)  # (R,)
    centroids = x[first].unsqueeze(1)  # (R, 1, k)
    best = squared_distances(x, centroids).squeeze(-1)  # (R, N)
    for _ in range(1, m):
        # ∝ weight · D²; rows at distance 0 (duplicates) keep a tiny chance so that a draw always exists.
        score = log_w + best.clamp(min=1e-30).log()
        nxt = x[_gumbel_argmax(score, generator)]  # (R, k)
        centroids = torch.cat([centroids, nxt.unsqueeze(1)], dim=1)
        best = torch.minimum(best, squared_distances(x, nxt.unsqueeze(1)).squeeze(-1))
    return centroids


def _stops_early(x: torch.Tensor, stop_early: bool | None) -> bool:
    """Whether a loop may read the device to end early: by default only on the CPU (nothing to synchronize)."""
    return x.device.type == "cpu" if stop_early is None else stop_early


def lloyd(x: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, iters: int, *,
          stop_early: bool | None = None) -> torch.Tensor:
    """`iters` Lloyd iterations for a batch of centroid sets (R, m, k); weighted means; an empty cluster keeps
    its previous centroid. With `stop_early` (default: on the CPU) it returns as soon as the assignments repeat:
    the centroids are then a fixed point, so the result is the one of all `iters` iterations, bit for bit."""
    m = centroids.shape[-2]
    early = _stops_early(x, stop_early)
    previous = None
    for _ in range(iters):
        assign = nearest(x, centroids)  # (R, N)
        if early:
            # Same assignments → the same means as the last iteration computed → these centroids again.
            if previous is not None and torch.equal(assign, previous):
                break
            previous = assign
        onehot = one_hot(assign, m, x.dtype) * weights[None, :, None]  # (R, N, m)
        counts = onehot.sum(dim=1)  # (R, m)
        sums = torch.matmul(onehot.transpose(1, 2), x)  # (R, m, k)
        means = sums / counts.clamp(min=1e-30)[..., None]
        centroids = torch.where(counts[..., None] > 0, means, centroids)
    return centroids


def kmeans(x: torch.Tensor, weights: torch.Tensor, m: int, *, n_init: int, iters: int,
           generator: torch.Generator, stop_early: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroids (m, k) of the weighted rows x (N, k) and their inertia Σ_i w_i min_j ‖x_i − c_j‖² (0-dim)
    (`stop_early`: see `lloyd`)."""
    x = x.float()
    weights = weights.to(x.dtype)
    init = kmeans_plus_plus(x, weights, m, n_init, generator)
    centroids = lloyd(x, weights, init, iters, stop_early=stop_early)
    inertia = (squared_distances(x, centroids).min(dim=-1).values * weights).sum(dim=-1)  # (R,)
    best = inertia.argmin().reshape(1)  # indexing with a 0-dim tensor would read it on the host
    return centroids.index_select(0, best)[0], inertia.index_select(0, best)[0]


def reseed_empty(x: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, *,
                 stop_early: bool | None = None) -> torch.Tensor:
    """Centroids (m, k) with every cluster that holds no weighted row moved onto the row farthest from all
    centroids (then the next farthest, ...): a refit started from old centroids never keeps a dead domain.
    With `stop_early` (default: on the CPU) only the empty clusters are visited (a non-empty one changes
    nothing): the same result."""
    m = centroids.shape[0]
    closest = squared_distances(x, centroids).min(dim=-1)
    counts = torch.zeros(m, dtype=x.dtype, device=x.device).index_add_(0, closest.indices, weights)
    far = closest.values * (weights > 0)
    visit = (counts <= 0).nonzero().flatten().tolist() if _stops_early(x, stop_early) else range(m)
    index = torch.arange(m, device=x.device)  # cluster j's index as a device tensor: no host→device copy
    for j in visit:
        farthest = x.index_select(0, far.argmax().reshape(1))  # (1, k), without reading the argmax on the host
        empty = counts[j] <= 0
        centroids = torch.where(empty, centroids.index_copy(0, index[j:j + 1], farthest), centroids)
        # that row is taken: the next empty cluster goes to the next farthest one
        far = torch.where(empty, torch.minimum(far, ((x - farthest) ** 2).sum(-1) * (weights > 0)), far)
    return centroids


def refine(x: torch.Tensor, weights: torch.Tensor, centroids: torch.Tensor, iters: int, *,
           stop_early: bool | None = None) -> torch.Tensor:
    """A refit that starts from the current centroids (m, k): Lloyd iterations, empty clusters re-seeded, Lloyd
    again. Centroid j stays domain j — the domains keep their identity from one refit to the next — and it
    costs one K-means run instead of `n_init` seeded ones (`stop_early`: see `lloyd`)."""
    x = x.float()
    weights = weights.to(x.dtype)
    c = lloyd(x, weights, centroids.float()[None], max(1, iters // 2), stop_early=stop_early)[0]
    c = reseed_empty(x, weights, c, stop_early=stop_early)
    return lloyd(x, weights, c[None], max(1, iters - iters // 2), stop_early=stop_early)[0]
