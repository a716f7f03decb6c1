"""Domain weights on the probability simplex (METHOD.md step 5).

Given the statistics of the m domains of one micro-batch (`DomainStats`), each objective returns
weights w ∈ Δ_m. Four objectives are built in and a registry (`OBJECTIVE_SOLVERS`) lets users add
their own. An optional graph term λ·wᵀL_G·w, with L_G the Laplacian of the domains' cosine-similarity
graph, makes gradient-aligned domains take similar weights.

m is small (the paper uses 11), so everything runs in float64 NumPy on the CPU and the problems are
solved exactly rather than approximately: the quadratic programs by a primal active-set method
after a short accelerated projected-gradient (FISTA) warm start (`solver_iters` FISTA iterations are
the fallback should the active set cycle), the entropy-regularized `robust` problem by damped Newton.
The solvers run with single-threaded BLAS: threads only slow down such small problems.

Sign convention of `ObjectiveResult.value`: `uncertainty` and `variance` are minimized, `robust` and
`alignment` are maximized; `value` is the objective itself (not negated), at the returned weights.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from .config import DoGraphSettings
from .domains import DomainStats

# Norms at or below this count as zero (cosine with a zero vector is defined as 0).
_TINY = 1e-300


@dataclass
class ObjectiveResult:
    """Weights of the m domains and the objective's value at them.

    weights: (m,) float64 on the CPU, on the simplex (≥ 0, sums to 1).
    value:   the objective at `weights`, graph term included (minimized for `uncertainty` and
             `variance`, maximized for `robust` and `alignment`).
    """

    weights: torch.Tensor
    value: float


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


def _simplex_projection_np(v: np.ndarray) -> np.ndarray:
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
    arr = _as_numpy(v).reshape(-1)
    if arr.size == 0:
        raise ValueError("project_to_simplex needs a non-empty vector")
    if not np.all(np.isfinite(arr)):
        raise ValueError("project_to_simplex got a non-finite entry")
    return torch.from_numpy(_simplex_projection_np(arr))


def _cosine_matrix(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Cosines between the rows of x and the rows of y; 0 wherever a row is the zero vector."""
    nx = np.linalg.norm(x, axis=1)
    ny = np.linalg.norm(y, axis=1)
    dots = x @ y.T
    denom = np.outer(nx, ny)
    ok = denom > _TINY
    out = np.zeros_like(dots)
    out[ok] = dots[ok] / denom[ok]
    return np.clip(out, -1.0, 1.0)


def _laplacian_np(centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    adjacency = np.maximum(_cosine_matrix(centroids, centroids), 0.0)
    np.fill_diagonal(adjacency, 0.0)
    adjacency = 0.5 * (adjacency + adjacency.T)  # exact symmetry despite rounding in x @ x.T
    laplacian = np.diag(adjacency.sum(axis=1)) - adjacency
    return adjacency, laplacian


def domain_graph_laplacian(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The domain graph (A, L) of METHOD.md step 5.

    A_jk = max(0, cos(z̄_j, z̄_k)) for j ≠ k, A_jj = 0 (a zero centroid has no edges);
    L = D − A with D = diag(A·1). L is symmetric positive semi-definite, rows summing to 0, and
    wᵀLw = ½ Σ_jk A_jk (w_j − w_k)². Both (m, m) float64 on the CPU.
    """
    adjacency, laplacian = _laplacian_np(_as_numpy(centroids).reshape(centroids.shape[0], -1))
    return torch.from_numpy(adjacency), torch.from_numpy(laplacian)


# ----------------------------------------------------------------------------------------------------
# Convex QP on the simplex: min ½ wᵀQw + cᵀw, w ∈ Δ_m (Q symmetric PSD)
# ----------------------------------------------------------------------------------------------------


def _uniform(m: int) -> np.ndarray:
    return np.full(m, 1.0 / m)


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
        w_next = _simplex_projection_np(y - (q @ y + c) / lipschitz)
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


def _solve_simplex_qp(q: np.ndarray, c: np.ndarray, iters: int) -> np.ndarray:
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


# ----------------------------------------------------------------------------------------------------
# The four objectives
# ----------------------------------------------------------------------------------------------------


def _graph_term(laplacian: np.ndarray, w: np.ndarray, lam: float) -> float:
    return float(lam * (w @ laplacian @ w)) if lam > 0 else 0.0


def _uncertainty_eps(sigma2: np.ndarray, settings: DoGraphSettings) -> float:
    mean = float(sigma2.mean())
    # All domains singletons (σ² = 0): a relative ε would be 0 and the problem degenerate; an absolute
    # ε gives equal curvature to every domain, hence uniform weights.
    return settings.uncertainty_eps * mean if mean > 0 else float(settings.uncertainty_eps)


def _uncertainty_value(stats: DomainStats, settings: DoGraphSettings, w: np.ndarray) -> float:
    sigma2 = _as_numpy(stats.sigma2)
    eps = _uncertainty_eps(sigma2, settings)
    _, lap = _laplacian_np(_as_numpy(stats.centroids))
    return float(w @ (w * (sigma2 + eps))) + _graph_term(lap, w, settings.graph_lambda)


def solve_uncertainty(stats: DomainStats, settings: DoGraphSettings) -> ObjectiveResult:
    """`uncertainty`: min_w Σ_j w_j²(σ_j² + ε) + λ wᵀL_G w on the simplex (stable domains weigh more).

    ε = uncertainty_eps × mean(σ²) (or uncertainty_eps itself when every σ² is 0). With λ = 0 the
    closed form w_j ∝ 1/(σ_j² + ε); otherwise the convex QP min wᵀ(diag(σ² + ε) + λL_G)w, solved exactly.
    """
    sigma2 = _as_numpy(stats.sigma2)
    curvature = sigma2 + _uncertainty_eps(sigma2, settings)
    if settings.graph_lambda > 0:
        _, lap = _laplacian_np(_as_numpy(stats.centroids))
        q = 2.0 * (np.diag(curvature) + settings.graph_lambda * lap)
        w = _solve_simplex_qp(q, np.zeros(len(sigma2)), settings.solver_iters)
    else:
        inv = 1.0 / curvature
        w = inv / inv.sum()
    return ObjectiveResult(torch.from_numpy(w), _uncertainty_value(stats, settings, w))


def _variance_terms(stats: DomainStats, settings: DoGraphSettings):
    """(Q, c, const) with f(w) = ½ wᵀQw + cᵀw + const for the `variance` objective (graph term included)."""
    z = _as_numpy(stats.centroids)
    m = z.shape[0]
    zbar = _as_numpy(stats.mean_sketch).reshape(-1)
    a = np.linalg.norm(z, axis=1)
    abar2 = _variance_scale(a) ** 2
    rho = settings.variance_penalty
    # Var_j(m w_j a_j) = m Σ w_j² a_j² − (Σ w_j a_j)²
    quad = (m * np.diag(a * a) - np.outer(a, a)) / abar2 + rho * (z @ z.T) / abar2
    if settings.graph_lambda > 0:
        quad = quad + settings.graph_lambda * _laplacian_np(z)[1]
    lin = -2.0 * rho * (z @ zbar) / abar2
    const = rho * float(zbar @ zbar) / abar2
    return 2.0 * quad, lin, const


def _variance_scale(norms: np.ndarray) -> float:
    # ā normalizes the objective so that ρ means the same whatever the gradient scale; a batch whose
    # centroids are all zero has no scale, and any positive constant then gives the same minimizer.
    abar = float(norms.mean())
    return abar if abar > _TINY else 1.0


def _variance_value(stats: DomainStats, settings: DoGraphSettings, w: np.ndarray) -> float:
    # Straight from the definition (not from Q, c), so that the reported value double-checks the QP.
    z = _as_numpy(stats.centroids)
    m = z.shape[0]
    zbar = _as_numpy(stats.mean_sketch).reshape(-1)
    a = np.linalg.norm(z, axis=1)
    abar = _variance_scale(a)
    spread = float(np.var(m * w * a)) / abar**2
    gap = w @ z - zbar
    penalty = settings.variance_penalty * float(gap @ gap) / abar**2
    return spread + penalty + _graph_term(_laplacian_np(z)[1], w, settings.graph_lambda)


def solve_variance(stats: DomainStats, settings: DoGraphSettings) -> ObjectiveResult:
    """`variance`: balanced weighted gradient magnitudes, aggregate kept near the plain mean.

    min_w Var_j(m·w_j·a_j)/ā² + ρ‖Σ_j w_j z̄_j − z̄‖²/ā² + λ wᵀL_G w on the simplex, with a_j = ‖z̄_j‖,
    ā = mean_j a_j (1 if 0), z̄ the batch's mean sketch, ρ = variance_penalty, Var the population
    variance over the m domains. A convex QP, solved exactly.
    """
    q, c, _ = _variance_terms(stats, settings)
    w = _solve_simplex_qp(q, c, settings.solver_iters)
    return ObjectiveResult(torch.from_numpy(w), _variance_value(stats, settings, w))


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _entropy(w: np.ndarray) -> float:
    pos = w > 0
    return float(-(w[pos] * np.log(w[pos])).sum())


def _robust_value(stats: DomainStats, settings: DoGraphSettings, w: np.ndarray) -> float:
    losses = _as_numpy(stats.losses)
    _, lap = _laplacian_np(_as_numpy(stats.centroids))
    return (
        float(losses @ w)
        + settings.robust_temperature * _entropy(w)
        - _graph_term(lap, w, settings.graph_lambda)
    )


def _robust_newton(losses: np.ndarray, lap: np.ndarray, tau: float, lam: float, iters: int) -> np.ndarray:
    """The maximizer of Lᵀw + τH(w) − λwᵀL_Gw on the simplex, by damped Newton on its optimality condition.

    The objective is strictly concave and its entropy term keeps the maximizer in the interior, where
    KKT reads w = softmax(v) with v = (L − 2λ L_G w)/τ. We solve G(v) = v − (L − 2λ L_G softmax(v))/τ = 0
    in the logits v, which stay finite even when some w_j underflow. The Jacobian I + (2λ/τ) L_G J_s
    (J_s = diag(w) − wwᵀ) has eigenvalues ≥ 1, so the Newton step always exists and descends on ½‖G‖²;
    with backtracking on that merit the iteration converges globally, then quadratically.
    """
    coef = 2.0 * lam / tau

    def residual(v: np.ndarray) -> np.ndarray:
        return v - (losses - 2.0 * lam * (lap @ _softmax(v))) / tau

    v = losses / tau  # the λ = 0 solution's logits
    g = residual(v)
    for _ in range(iters):
        merit = 0.5 * float(g @ g)
        if np.abs(g).max() <= 1e-14 * (1.0 + np.abs(v).max()):
            break
        w = _softmax(v)
        jac = np.eye(len(v)) + coef * (lap @ (np.diag(w) - np.outer(w, w)))
        step = np.linalg.solve(jac, -g)
        t = 1.0
        while True:
            v_try = v + t * step
            g_try = residual(v_try)
            if 0.5 * float(g_try @ g_try) <= (1.0 - 1e-4 * t) * merit or t < 1e-12:
                break
            t *= 0.5
        v, g = v_try, g_try
    return _softmax(v)


def solve_robust(stats: DomainStats, settings: DoGraphSettings) -> ObjectiveResult:
    """`robust` (a smooth group DRO): max_w Σ_j w_j L_j − τ Σ_j w_j log w_j − λ wᵀL_G w on the simplex.

    τ = robust_temperature. With λ = 0 the closed form softmax(L/τ); otherwise damped Newton on the
    optimality condition (the problem is strictly concave, its maximizer unique and interior).
    """
    losses = _as_numpy(stats.losses)
    tau = float(settings.robust_temperature)
    if settings.graph_lambda > 0 and len(losses) > 1:
        _, lap = _laplacian_np(_as_numpy(stats.centroids))
        w = _robust_newton(losses, lap, tau, settings.graph_lambda, max(settings.solver_iters, 100))
    else:
        w = _softmax(losses / tau)
    return ObjectiveResult(torch.from_numpy(w), _robust_value(stats, settings, w))


def _alignment_cosines(z: np.ndarray, w: np.ndarray) -> np.ndarray:
    """cos(z̄_j, g) for g = Σ_k w_k z̄_k (0 where either vector is zero)."""
    return _cosine_matrix(z, (w @ z)[None, :])[:, 0]


def _alignment_fixed_point(z: np.ndarray, iters: int) -> np.ndarray:
    w = _uniform(z.shape[0])
    for _ in range(iters):
        new = np.maximum(_alignment_cosines(z, w), 0.0)
        total = new.sum()
        if total <= 0.0:
            break  # no domain points along the aggregate: keep the previous weights
        w = new / total
    return w


def _alignment_value(stats: DomainStats, settings: DoGraphSettings, w: np.ndarray) -> float:
    z = _as_numpy(stats.centroids)
    return float(w @ _alignment_cosines(z, w)) - _graph_term(_laplacian_np(z)[1], w, settings.graph_lambda)


def solve_alignment(stats: DomainStats, settings: DoGraphSettings) -> ObjectiveResult:
    """`alignment`: weights follow how well each domain agrees with the aggregate gradient.

    From uniform w, `alignment_iters` times: g = Σ_k w_k z̄_k, w_j ← max(0, cos(z̄_j, g)), renormalized
    (all zero: the previous w is kept). The value is Σ_j w_j cos(z̄_j, g(w)) − λ wᵀL_G w.

    Graph term (ours; the paper gives none for this objective): with λ > 0 the fixed point w_fp is then
    smoothed on the domain graph, w = argmin_{w ∈ Δ} ½‖w − w_fp‖² + λ wᵀL_G w (a strongly convex QP).
    """
    z = _as_numpy(stats.centroids)
    w = _alignment_fixed_point(z, settings.alignment_iters)
    if settings.graph_lambda > 0 and len(w) > 1:
        lap = _laplacian_np(z)[1]
        q = np.eye(len(w)) + 2.0 * settings.graph_lambda * lap
        w = _solve_simplex_qp(q, -w, settings.solver_iters)
    return ObjectiveResult(torch.from_numpy(w), _alignment_value(stats, settings, w))


Solver = Callable[[DomainStats, DoGraphSettings], ObjectiveResult]

OBJECTIVE_SOLVERS: dict[str, Solver] = {
    "uncertainty": solve_uncertainty,
    "variance": solve_variance,
    "robust": solve_robust,
    "alignment": solve_alignment,
}
"""Objective name -> solver(stats, settings) -> ObjectiveResult. Add an entry to use your own objective
(`settings.objective` must then name it; note that `DoGraphSettings.validate_dograph` only accepts the
built-in names, so construct the settings without validation or call the solver through this registry)."""

# The built-in solvers, and their values at arbitrary weights: to report the value after `uniform_mix`
# moved the weights (unless a user replaced the built-in solver under its name).
_BUILTIN_SOLVERS = dict(OBJECTIVE_SOLVERS)
_BUILTIN_VALUES = {
    "uncertainty": _uncertainty_value,
    "variance": _variance_value,
    "robust": _robust_value,
    "alignment": _alignment_value,
}


@lru_cache(maxsize=1)
def _blas_controller():
    try:
        from threadpoolctl import ThreadpoolController  # a dependency of scikit-learn
    except ImportError:
        return None
    return ThreadpoolController()


def _single_threaded_blas():
    """m×m problems (m ≤ ~64) gain nothing from BLAS threads, and on a busy machine their
    synchronization makes a 40×40 eigendecomposition 10-50× slower: run the solvers on one thread."""
    controller = _blas_controller()
    return contextlib.nullcontext() if controller is None else controller.limit(limits=1, user_api="blas")


def _checked_weights(weights: torch.Tensor, m: int, name: str) -> np.ndarray:
    w = _as_numpy(torch.as_tensor(weights)).reshape(-1)
    if w.shape != (m,):
        raise ValueError(f"objective {name!r} returned {w.shape[0]} weights for {m} domains")
    if not np.all(np.isfinite(w)) or (w < -1e-9).any() or abs(w.sum() - 1.0) > 1e-6:
        raise ValueError(f"objective {name!r} returned weights off the simplex: {w.tolist()}")
    # Remove rounding dust so that the weights are exactly non-negative and sum to 1 (to 1e-16).
    w = np.maximum(w, 0.0)
    return w / w.sum()


def solve_domain_weights(stats: DomainStats, settings: DoGraphSettings) -> ObjectiveResult:
    """Weights of the domains by `settings.objective` (looked up in `OBJECTIVE_SOLVERS`).

    Then the `uniform_mix` floor γ: w ← (1 − γ)w + γ/m. One domain gets weight [1.0]. The weights are
    float64 on the CPU, ≥ 0 and summing to 1; `value` is the objective at the returned weights (for a
    custom objective and γ > 0: the value its solver reported for its own, unmixed, weights).
    """
    name = settings.objective
    solver = OBJECTIVE_SOLVERS.get(name)
    if solver is None:
        raise ValueError(f"objective={name!r} is unknown: use one of {', '.join(sorted(OBJECTIVE_SOLVERS))}.")
    m = stats.num_domains
    if m < 1:
        raise ValueError("solve_domain_weights needs at least one domain")
    with _single_threaded_blas():
        result = solver(stats, settings)
    w = np.ones(1) if m == 1 else _checked_weights(result.weights, m, name)
    value = float(result.value)
    gamma = float(settings.uniform_mix)
    if gamma > 0 and m > 1:
        w = (1.0 - gamma) * w + gamma / m
        w = w / w.sum()
        if name in _BUILTIN_VALUES and OBJECTIVE_SOLVERS[name] is _BUILTIN_SOLVERS[name]:
            value = _BUILTIN_VALUES[name](stats, settings, w)
    return ObjectiveResult(torch.from_numpy(w), value)
