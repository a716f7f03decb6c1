"""Exact solvers on the probability simplex Δ_m = {w ≥ 0, Σ w = 1}, for the small m of domain weights.

- `project_to_simplex` / `simplex_projection`: the Euclidean projection onto Δ_m (sort-based, O(m log m)).
- `solve_simplex_qp`: argmin_{w ∈ Δ_m} ½ wᵀQw + cᵀw for a symmetric PSD Q, to machine precision: a short
  accelerated projected-gradient (FISTA) warm start, then a primal active-set method that certifies the
  optimum (`solver_iters` FISTA iterations are the fallback should the active set cycle).

Everything is float64 NumPy: m is small (the paper uses 11), so the problems are solved exactly rather than
approximately. The objectives (`objectives.py`) state the problems; this module only solves them.
"""

from __future__ import annotations

import numpy as np
import torch


def simplex_projection(v: np.ndarray) -> np.ndarray:
    """Euclidean projection of v onto {w ≥ 0, Σw = 1} (Held et al. 1974; Duchi et al. 2008)."""
    u = np.sort(v)[::-1]
    css = np.cumsum(u) - 1.0
    idx = np.arange(1, len(v) + 1)
    # rho = the largest k with u_k − (Σ_{i≤k} u_i − 1)/k > 0; k = 1 always qualifies.
    rho = int(np.nonzero(u - css / idx > 0)[0][-1])
    theta = css[rho] / (rho + 1)
    return np.maximum(v - theta, 0.0)


def project_to_simplex(v: torch.Tensor) -> torch.Tensor:
    """Exact Euclidean projection of a vector onto the probability simplex.

    argmin_{w ≥ 0, Σ w = 1} ‖w − v‖, by the O(m log m) sort-based algorithm. Returns float64 on the CPU.
    """
    arr = v.detach().to("cpu", torch.float64).numpy().reshape(-1)
    if arr.size == 0:
        raise ValueError("project_to_simplex needs a non-empty vector")
    if not np.all(np.isfinite(arr)):
        raise ValueError("project_to_simplex got a non-finite entry")
    return torch.from_numpy(simplex_projection(arr))


# ----------------------------------------------------------------------------------------------------
# Convex QP on the simplex: min ½ wᵀQw + cᵀw, w ∈ Δ_m (Q symmetric PSD)
# ----------------------------------------------------------------------------------------------------


def _qp_value(q: np.ndarray, c: np.ndarray, w: np.ndarray) -> float:
    return float(0.5 * w @ q @ w + c @ w)


def _fista_simplex(q: np.ndarray, c: np.ndarray, iters: int) -> np.ndarray:
    """Accelerated projected gradient (FISTA) from the uniform point, step 1/λ_max(Q). Used as a warm
    start for `_active_set_simplex`, which makes its result exact: a few dozen iterations usually find
    the optimal support, leaving the active-set method one or two solves."""
    m = len(c)
    w = np.full(m, 1.0 / m)
    # An upper bound on λ_max(Q) is a valid (slightly smaller) step and costs no eigendecomposition.
    lipschitz = min(float(np.linalg.norm(q)), float(np.abs(q).sum(axis=1).max()))
    if lipschitz <= 0.0:
        # Q = 0: a linear objective, whose minimum over the simplex is at the best vertex.
        if np.ptp(c) > 0:
            w = np.zeros(m)
            w[int(np.argmin(c))] = 1.0
        return w
    y, t = w.copy(), 1.0
    for _ in range(iters):
        w_next = simplex_projection(y - (q @ y + c) / lipschitz)
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        y = w_next + ((t - 1.0) / t_next) * (w_next - w)
        moved = float(np.abs(w_next - w).max())
        w, t = w_next, t_next
        if moved <= 1e-9:
            break  # close enough for the active-set polish
    return w


def _face_direction(q_ff: np.ndarray, g_f: np.ndarray, scale: float) -> tuple[np.ndarray, bool]:
    """A descent direction on the face {w_F free, Σ w_F = 1}, and whether it is a full Newton step.

    Both come from one eigendecomposition of the face's KKT matrix K = [Q_FF 1; 1ᵀ 0], whose null
    space is {(d, 0): Q_FF d = 0, 1ᵀd = 0}: the directions of zero curvature that keep Σ w fixed
    (only when Q is singular). If the gradient has a component along them, the objective is linear
    there and the face minimum lies on the face's boundary: return that component, negated (a ray to
    follow until a coordinate hits 0). Otherwise the Newton step p of the face's equality-constrained
    QP, K [p; μ] = [−g_F; 0], which lands on the face minimum.
    """
    k = len(g_f)
    kkt = np.zeros((k + 1, k + 1))
    kkt[:k, :k] = q_ff
    kkt[:k, k] = 1.0
    kkt[k, :k] = 1.0
    evals, evecs = np.linalg.eigh(kkt)
    null = np.abs(evals) <= 1e-12 * max(scale, float(np.abs(evals).max()))
    null_dirs = evecs[:k, null]
    ray = -(null_dirs @ (null_dirs.T @ g_f))
    if np.abs(ray).max(initial=0.0) > 1e-13 * scale:
        return ray, False
    rhs = np.concatenate([-g_f, [0.0]])
    kept = evecs[:, ~null]
    newton = kept @ ((kept.T @ rhs) / evals[~null])
    return newton[:k], True


def _active_set_simplex(
    q: np.ndarray, c: np.ndarray, w0: np.ndarray, max_iter: int
) -> tuple[np.ndarray, bool]:
    """Primal active-set method (Nocedal & Wright, Alg. 16.3) started at a feasible w0.

    The working set holds the coordinates fixed at 0. Each iteration moves, within the face of the
    free coordinates, towards the face's minimum (`_face_direction`) as far as feasibility allows
    (a blocking coordinate joins the working set); at the face minimum it frees the fixed coordinate
    with the most negative multiplier. Handles singular Q. Returns (w, True) at a point satisfying the
    KKT conditions (the exact optimum up to rounding), or (w, False) after `max_iter` iterations
    (degenerate problems can cycle); w is feasible either way and the objective never increases.
    """
    m = len(c)
    w = w0.copy()
    free = w > 0.0
    scale = 1.0 + float(np.abs(q).max()) + float(np.abs(c).max())
    at_face_minimum = False  # set after a full Newton step: no need to recompute one from rounding noise
    for _ in range(max_iter):
        f_idx = np.flatnonzero(free)
        grad = q @ w + c
        g_f = grad[f_idx]
        # Σp = 0 on the face, so only the gradient's deviation from its mean matters; centering keeps
        # the slope accurate near the optimum, where the gradient is nearly constant on the face.
        slope_grad = g_f - g_f.mean()
        stationary = at_face_minimum or np.abs(slope_grad).max() <= 1e-13 * scale
        if not stationary:
            p_f, is_newton = _face_direction(q[np.ix_(f_idx, f_idx)], g_f, scale)
            p_f = p_f - p_f.mean()  # stay exactly on Σ w = 1
            slope = float(slope_grad @ p_f)
            stationary = slope >= 0.0 or np.abs(p_f).max() <= 1e-15
        at_face_minimum = False
        if stationary:
            # The face minimum: check the multipliers of the coordinates fixed at 0.
            nu = np.where(free, np.inf, grad - g_f.mean())
            j = int(np.argmin(nu))
            if nu[j] >= -1e-13 * scale:
                return w, True
            free[j] = True
            continue
        p = np.zeros(m)
        p[f_idx] = p_f
        if is_newton:
            alpha = 1.0  # lands on the face minimum
        else:
            # A ray of zero curvature (up to rounding): exact line search, in effect unbounded.
            curvature = float(p_f @ q[np.ix_(f_idx, f_idx)] @ p_f)
            alpha = -slope / curvature if curvature > 0 else np.inf
        shrinking = p < 0.0
        blocking = None
        if shrinking.any():
            ratios = np.full(m, np.inf)
            ratios[shrinking] = w[shrinking] / -p[shrinking]
            j = int(np.argmin(ratios))
            if ratios[j] <= alpha:
                alpha, blocking = float(ratios[j]), j
        if not np.isfinite(alpha):
            return w, False  # cannot happen on the bounded simplex; a guard against rounding
        w = np.maximum(w + alpha * p, 0.0)
        if blocking is not None:
            w[blocking] = 0.0
            free[blocking] = False
        else:
            at_face_minimum = is_newton
        w = w / w.sum()
    return w, False


# FISTA iterations before the first active-set polish: enough to find the support in practice.
_WARM_START_ITERS = 50


def solve_simplex_qp(q: np.ndarray, c: np.ndarray, iters: int) -> np.ndarray:
    """argmin_{w ∈ Δ_m} ½ wᵀQw + cᵀw for a symmetric PSD Q, to machine precision.

    A short FISTA warm start, then the active-set method, which certifies the optimum in one or two
    small solves. Should it not (a degenerate problem cycling), `iters` (`solver_iters`) FISTA
    iterations give a second warm start, and the best point seen is returned.
    """
    q = 0.5 * (q + q.T)
    m = len(c)
    warm = _fista_simplex(q, c, min(iters, _WARM_START_ITERS))
    w, converged = _active_set_simplex(q, c, warm, max_iter=10 * m + 100)
    if converged:
        return w
    warm = _fista_simplex(q, c, iters)
    polished, _ = _active_set_simplex(q, c, warm, max_iter=10 * m + 100)
    return min((w, warm, polished), key=lambda x: _qp_value(q, c, x))
