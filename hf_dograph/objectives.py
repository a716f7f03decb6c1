"""Domain weights on the probability simplex (METHOD.md step 5).

Given the statistics of the m domains of one micro-batch (`DomainStats`), each objective returns
weights w ∈ Δ_m. Four objectives are built in and a registry (`OBJECTIVE_SOLVERS`) lets users add
their own. An optional graph term λ·wᵀL_G·w, with L_G the Laplacian of the domains' cosine-similarity
graph, makes gradient-aligned domains take similar weights.

Each objective takes its own parameters (`ObjectiveParams`: the objective's name, λ, ε, τ, ...), not the
whole DoGraph configuration; `ObjectiveParams.from_settings` picks them out of a `DoGraphSettings`. The
registry also checks names (`check_objective_name`), which the settings call to validate theirs.

m is small (the paper uses 11), so everything runs in float64 NumPy on the CPU and the problems are
solved exactly rather than approximately: the quadratic programs by `simplex.solve_simplex_qp`, the
entropy-regularized `robust` problem by damped Newton. The solvers run with single-threaded BLAS: threads
only slow down such small problems.

Sign convention of `ObjectiveResult.value`: `uncertainty` and `variance` are minimized, `robust` and
`alignment` are maximized; `value` is the objective itself (not negated), at the returned weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import numpy as np
import torch

from .domains import DomainStats
from .simplex import solve_simplex_qp

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


@dataclass(frozen=True, kw_only=True)
class ObjectiveParams:
    """What the objectives read: the objective's name and the parameters of the solvers.

    The fields are those of `DoGraphSettings` with the same names (their meaning and defaults are its help
    texts': `from_settings(DoGraphSettings())` gives the defaults). A solver may also be handed any object
    that has these attributes, a `DoGraphSettings` among them.
    """

    objective: str
    graph_lambda: float
    uncertainty_eps: float
    robust_temperature: float
    alignment_iters: int
    variance_penalty: float
    uniform_mix: float
    solver_iters: int

    @classmethod
    def from_settings(cls, settings) -> ObjectiveParams:
        """The objective's parameters out of a `DoGraphSettings` (or anything with attributes of these names)."""
        return cls(**{f.name: getattr(settings, f.name) for f in dataclasses.fields(cls)})


# ----------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------


def _as_numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().to("cpu", torch.float64).numpy()


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


def _uniform(m: int) -> np.ndarray:
    return np.full(m, 1.0 / m)


# ----------------------------------------------------------------------------------------------------
# The four objectives
# ----------------------------------------------------------------------------------------------------


def _graph_term(laplacian: np.ndarray, w: np.ndarray, lam: float) -> float:
    return float(lam * (w @ laplacian @ w)) if lam > 0 else 0.0


def _uncertainty_eps(sigma2: np.ndarray, params: ObjectiveParams) -> float:
    mean = float(sigma2.mean())
    # All domains singletons (σ² = 0): a relative ε would be 0 and the problem degenerate; an absolute
    # ε gives equal curvature to every domain, hence uniform weights.
    return params.uncertainty_eps * mean if mean > 0 else float(params.uncertainty_eps)


def _uncertainty_value(stats: DomainStats, params: ObjectiveParams, w: np.ndarray) -> float:
    sigma2 = _as_numpy(stats.sigma2)
    eps = _uncertainty_eps(sigma2, params)
    _, lap = _laplacian_np(_as_numpy(stats.centroids))
    return float(w @ (w * (sigma2 + eps))) + _graph_term(lap, w, params.graph_lambda)


def solve_uncertainty(stats: DomainStats, params: ObjectiveParams) -> ObjectiveResult:
    """`uncertainty`: min_w Σ_j w_j²(σ_j² + ε) + λ wᵀL_G w on the simplex (stable domains weigh more).

    ε = uncertainty_eps × mean(σ²) (or uncertainty_eps itself when every σ² is 0). With λ = 0 the
    closed form w_j ∝ 1/(σ_j² + ε); otherwise the convex QP min wᵀ(diag(σ² + ε) + λL_G)w, solved exactly.
    """
    sigma2 = _as_numpy(stats.sigma2)
    curvature = sigma2 + _uncertainty_eps(sigma2, params)
    if params.graph_lambda > 0:
        _, lap = _laplacian_np(_as_numpy(stats.centroids))
        q = 2.0 * (np.diag(curvature) + params.graph_lambda * lap)
        w = solve_simplex_qp(q, np.zeros(len(sigma2)), params.solver_iters)
    else:
        inv = 1.0 / curvature
        w = inv / inv.sum()
    return ObjectiveResult(torch.from_numpy(w), _uncertainty_value(stats, params, w))


def _variance_terms(stats: DomainStats, params: ObjectiveParams):
    """(Q, c, const) with f(w) = ½ wᵀQw + cᵀw + const for the `variance` objective (graph term included)."""
    z = _as_numpy(stats.centroids)
    m = z.shape[0]
    zbar = _as_numpy(stats.mean_sketch).reshape(-1)
    a = np.linalg.norm(z, axis=1)
    abar2 = _variance_scale(a) ** 2
    rho = params.variance_penalty
    # Var_j(m w_j a_j) = m Σ w_j² a_j² − (Σ w_j a_j)²
    quad = (m * np.diag(a * a) - np.outer(a, a)) / abar2 + rho * (z @ z.T) / abar2
    if params.graph_lambda > 0:
        quad = quad + params.graph_lambda * _laplacian_np(z)[1]
    lin = -2.0 * rho * (z @ zbar) / abar2
    const = rho * float(zbar @ zbar) / abar2
    return 2.0 * quad, lin, const


def _variance_scale(norms: np.ndarray) -> float:
    # ā normalizes the objective so that ρ means the same whatever the gradient scale; a batch whose
    # centroids are all zero has no scale, and any positive constant then gives the same minimizer.
    abar = float(norms.mean())
    return abar if abar > _TINY else 1.0


def _variance_value(stats: DomainStats, params: ObjectiveParams, w: np.ndarray) -> float:
    # Straight from the definition (not from Q, c), so that the reported value double-checks the QP.
    z = _as_numpy(stats.centroids)
    m = z.shape[0]
    zbar = _as_numpy(stats.mean_sketch).reshape(-1)
    a = np.linalg.norm(z, axis=1)
    abar = _variance_scale(a)
    spread = float(np.var(m * w * a)) / abar**2
    gap = w @ z - zbar
    penalty = params.variance_penalty * float(gap @ gap) / abar**2
    return spread + penalty + _graph_term(_laplacian_np(z)[1], w, params.graph_lambda)


def solve_variance(stats: DomainStats, params: ObjectiveParams) -> ObjectiveResult:
    """`variance`: balanced weighted gradient magnitudes, aggregate kept near the plain mean.

    min_w Var_j(m·w_j·a_j)/ā² + ρ‖Σ_j w_j z̄_j − z̄‖²/ā² + λ wᵀL_G w on the simplex, with a_j = ‖z̄_j‖,
    ā = mean_j a_j (1 if 0), z̄ the batch's mean sketch, ρ = variance_penalty, Var the population
    variance over the m domains. A convex QP, solved exactly.
    """
    q, c, _ = _variance_terms(stats, params)
    w = solve_simplex_qp(q, c, params.solver_iters)
    return ObjectiveResult(torch.from_numpy(w), _variance_value(stats, params, w))


def _softmax(v: np.ndarray) -> np.ndarray:
    e = np.exp(v - v.max())
    return e / e.sum()


def _entropy(w: np.ndarray) -> float:
    pos = w > 0
    return float(-(w[pos] * np.log(w[pos])).sum())


def _robust_value(stats: DomainStats, params: ObjectiveParams, w: np.ndarray) -> float:
    losses = _as_numpy(stats.losses)
    _, lap = _laplacian_np(_as_numpy(stats.centroids))
    return (
        float(losses @ w)
        + params.robust_temperature * _entropy(w)
        - _graph_term(lap, w, params.graph_lambda)
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


def solve_robust(stats: DomainStats, params: ObjectiveParams) -> ObjectiveResult:
    """`robust` (a smooth group DRO): max_w Σ_j w_j L_j − τ Σ_j w_j log w_j − λ wᵀL_G w on the simplex.

    τ = robust_temperature. With λ = 0 the closed form softmax(L/τ); otherwise damped Newton on the
    optimality condition (the problem is strictly concave, its maximizer unique and interior).
    """
    losses = _as_numpy(stats.losses)
    tau = float(params.robust_temperature)
    if params.graph_lambda > 0 and len(losses) > 1:
        _, lap = _laplacian_np(_as_numpy(stats.centroids))
        w = _robust_newton(losses, lap, tau, params.graph_lambda, max(params.solver_iters, 100))
    else:
        w = _softmax(losses / tau)
    return ObjectiveResult(torch.from_numpy(w), _robust_value(stats, params, w))


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


def _alignment_value(stats: DomainStats, params: ObjectiveParams, w: np.ndarray) -> float:
    z = _as_numpy(stats.centroids)
    return float(w @ _alignment_cosines(z, w)) - _graph_term(_laplacian_np(z)[1], w, params.graph_lambda)


def solve_alignment(stats: DomainStats, params: ObjectiveParams) -> ObjectiveResult:
    """`alignment`: weights follow how well each domain agrees with the aggregate gradient.

    From uniform w, `alignment_iters` times: g = Σ_k w_k z̄_k, w_j ← max(0, cos(z̄_j, g)), renormalized
    (all zero: the previous w is kept). The value is Σ_j w_j cos(z̄_j, g(w)) − λ wᵀL_G w.

    Graph term (ours; the paper gives none for this objective): with λ > 0 the fixed point w_fp is then
    smoothed on the domain graph, w = argmin_{w ∈ Δ} ½‖w − w_fp‖² + λ wᵀL_G w (a strongly convex QP).
    """
    z = _as_numpy(stats.centroids)
    w = _alignment_fixed_point(z, params.alignment_iters)
    if params.graph_lambda > 0 and len(w) > 1:
        lap = _laplacian_np(z)[1]
        q = np.eye(len(w)) + 2.0 * params.graph_lambda * lap
        w = solve_simplex_qp(q, -w, params.solver_iters)
    return ObjectiveResult(torch.from_numpy(w), _alignment_value(stats, params, w))


Solver = Callable[[DomainStats, ObjectiveParams], ObjectiveResult]

OBJECTIVE_SOLVERS: dict[str, Solver] = {
    "uncertainty": solve_uncertainty,
    "variance": solve_variance,
    "robust": solve_robust,
    "alignment": solve_alignment,
}
"""Objective name -> solver(stats, params) -> ObjectiveResult. Add an entry to use your own objective: a
registered name is then a valid `objective` setting (`check_objective_name`)."""


def check_objective_name(name: str) -> None:
    """Raise a `ValueError` naming the registered objectives (and how to add one) unless `name` is one."""
    if name not in OBJECTIVE_SOLVERS:
        raise ValueError(
            f"objective={name!r} is unknown: use one of {', '.join(OBJECTIVE_SOLVERS)} "
            "(or register yours in hf_dograph.objectives.OBJECTIVE_SOLVERS)."
        )


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


def solve_domain_weights(stats: DomainStats, params: ObjectiveParams) -> ObjectiveResult:
    """Weights of the domains by `params.objective` (looked up in `OBJECTIVE_SOLVERS`).

    Then the `uniform_mix` floor γ: w ← (1 − γ)w + γ/m. One domain gets weight [1.0]. The weights are
    float64 on the CPU, ≥ 0 and summing to 1; `value` is the objective at the returned weights (for a
    custom objective and γ > 0: the value its solver reported for its own, unmixed, weights).
    """
    name = params.objective
    check_objective_name(name)
    solver = OBJECTIVE_SOLVERS[name]
    m = stats.num_domains
    if m < 1:
        raise ValueError("solve_domain_weights needs at least one domain")
    with _single_threaded_blas():
        result = solver(stats, params)
    w = np.ones(1) if m == 1 else _checked_weights(result.weights, m, name)
    value = float(result.value)
    gamma = float(params.uniform_mix)
    if gamma > 0 and m > 1:
        w = (1.0 - gamma) * w + gamma / m
        w = w / w.sum()
        if name in _BUILTIN_VALUES and OBJECTIVE_SOLVERS[name] is _BUILTIN_SOLVERS[name]:
            value = _BUILTIN_VALUES[name](stats, params, w)
    return ObjectiveResult(torch.from_numpy(w), value)
