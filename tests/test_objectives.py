"""Domain-weight objectives against brute-force solutions of the problems they state (METHOD.md step 5)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hf_dograph.config import DoGraphSettings
from hf_dograph.domains import DomainStats, domain_statistics
from hf_dograph.objectives import (
    OBJECTIVE_SOLVERS,
    ObjectiveResult,
    domain_graph_laplacian,
    solve_domain_weights,
)
from hf_dograph.simplex import project_to_simplex

scipy_optimize = pytest.importorskip("scipy.optimize")
threadpoolctl = pytest.importorskip("threadpoolctl")


@pytest.fixture(autouse=True, scope="module")
def single_threaded_blas():
    # The brute-force references solve thousands of tiny problems: BLAS threads only slow them down.
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        yield

SIZES = (2, 3, 5, 8, 11)
K = 16


def random_stats(m: int, seed: int, k: int = K) -> DomainStats:
    """Statistics of m domains from a random batch (3..6 samples per domain, varied spreads)."""
    rng = np.random.default_rng(seed)
    shared = rng.normal(size=k)  # a common direction, so that the graph has positive edges
    sketches, losses, labels = [], [], []
    for j in range(m):
        n = int(rng.integers(3, 7))
        center = 0.7 * shared + rng.normal(size=k) * rng.uniform(0.3, 2.0)
        sketches.append(center + rng.normal(size=(n, k)) * rng.uniform(0.05, 1.5))
        losses.append(rng.uniform(1.0, 4.0, size=n))
        labels += [j] * n
    return domain_statistics(
        torch.from_numpy(np.concatenate(sketches)),
        torch.from_numpy(np.concatenate(losses)),
        torch.tensor(labels),
    )


def settings(objective: str, lam: float = 0.0, **kw) -> DoGraphSettings:
    s = DoGraphSettings(objective=objective, graph_lambda=lam, **kw)
    s.validate_dograph()
    return s


# ---------------------------------------------------------------------------------------------------
# Independent numpy statements of each problem (f is minimized; maximized objectives are negated)
# ---------------------------------------------------------------------------------------------------


def np_stats(stats: DomainStats):
    return {f.name: getattr(stats, f.name).numpy() for f in dataclasses.fields(stats)}


def np_laplacian(z: np.ndarray) -> np.ndarray:
    m = len(z)
    a = np.zeros((m, m))
    for j in range(m):
        for k in range(m):
            nj, nk = np.linalg.norm(z[j]), np.linalg.norm(z[k])
            if j != k and nj > 0 and nk > 0:
                a[j, k] = max(0.0, z[j] @ z[k] / (nj * nk))
    return np.diag(a.sum(1)) - a


def uncertainty_f(st, s):
    s2 = st["sigma2"]
    eps = s.uncertainty_eps * s2.mean() if s2.mean() > 0 else s.uncertainty_eps
    lap = np_laplacian(st["centroids"])
    return lambda w: float(np.sum(w**2 * (s2 + eps)) + s.graph_lambda * w @ lap @ w)


def variance_f(st, s):
    z, zbar = st["centroids"], st["mean_sketch"]
    m = len(z)
    a = np.linalg.norm(z, axis=1)
    abar = a.mean() if a.mean() > 0 else 1.0
    lap = np_laplacian(z)

    def f(w):
        x = m * w * a
        spread = np.mean((x - x.mean()) ** 2)
        gap = w @ z - zbar
        return float(spread / abar**2 + s.variance_penalty * gap @ gap / abar**2 + s.graph_lambda * w @ lap @ w)

    return f


def robust_neg_f(st, s):
    lap = np_laplacian(st["centroids"])
    L, tau = st["losses"], s.robust_temperature

    def f(w):
        w = np.clip(w, 0, None)
        ent = -np.sum(np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0))
        return float(-(L @ w + tau * ent - s.graph_lambda * w @ lap @ w))

    return f


def simplex_grid(m: int):
    """A dense grid over the simplex for m = 2 (step 1/1000) and m = 3 (step 1/100); nothing for larger m."""
    if m == 2:
        for i in range(1001):
            yield np.array([i, 1000 - i]) / 1000
    elif m == 3:
        for i in range(101):
            for j in range(101 - i):
                yield np.array([i, j, 100 - i - j]) / 100


def brute_force(f, m: int, seed: int = 0, starts: int = 12):
    """Best of SLSQP from many random starts on the simplex, and of a dense grid for m ≤ 3."""
    rng = np.random.default_rng(seed)
    cons = [{"type": "eq", "fun": lambda w: w.sum() - 1.0, "jac": lambda w: np.ones_like(w)}]
    best_w, best_f = None, np.inf
    inits = [np.full(m, 1.0 / m)] + [rng.dirichlet(np.ones(m)) for _ in range(starts)]
    for w0 in inits:
        res = scipy_optimize.minimize(
            f, w0, method="SLSQP", bounds=[(0.0, 1.0)] * m, constraints=cons,
            options={"ftol": 1e-15, "maxiter": 1000},
        )
        w = np.clip(res.x, 0, None)
        w /= w.sum()
        if f(w) < best_f:
            best_w, best_f = w, f(w)
    for w in simplex_grid(m):
        if f(w) < best_f:
            best_w, best_f = w, f(w)
    return best_w, best_f


def assert_on_simplex(w: torch.Tensor, m: int):
    assert w.dtype == torch.float64 and w.shape == (m,)
    assert torch.isfinite(w).all()
    assert (w >= 0).all()
    assert abs(float(w.sum()) - 1.0) <= 1e-12


# ---------------------------------------------------------------------------------------------------
# 1. Each objective solves its stated problem
# ---------------------------------------------------------------------------------------------------

PROBLEMS = {"uncertainty": (uncertainty_f, 1.0), "variance": (variance_f, 1.0), "robust": (robust_neg_f, -1.0)}


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("lam", [0.0, 0.3, 3.0])
@pytest.mark.parametrize("objective", sorted(PROBLEMS))
def test_objective_matches_brute_force(objective, lam, m):
    stats = random_stats(m, seed=100 * m + int(10 * lam))
    extra = {"robust_temperature": 0.5} if objective == "robust" else {}
    s = settings(objective, lam, **extra)
    make_f, sign = PROBLEMS[objective]
    f = make_f(np_stats(stats), s)
    result = solve_domain_weights(stats, s)
    w = result.weights.numpy()
    assert_on_simplex(result.weights, m)
    # The reported value is the objective at the returned weights.
    assert sign * result.value == pytest.approx(f(w), rel=1e-10, abs=1e-12)
    bf_w, bf_f = brute_force(f, m, seed=m)
    assert f(w) <= bf_f + 1e-7 * max(1.0, abs(bf_f))
    np.testing.assert_allclose(w, bf_w, atol=1e-4)


def test_variance_without_penalty_balances_magnitudes():
    # ρ = 0, λ = 0: the minimum Var = 0 is reached at w_j ∝ 1/a_j.
    stats = random_stats(6, seed=3)
    w = solve_domain_weights(stats, settings("variance", variance_penalty=0.0)).weights.numpy()
    a = np.linalg.norm(stats.centroids.numpy(), axis=1)
    np.testing.assert_allclose(w, (1 / a) / (1 / a).sum(), atol=1e-10)


def test_robust_lambda0_is_softmax():
    stats = random_stats(7, seed=4)
    tau = 0.7
    w = solve_domain_weights(stats, settings("robust", robust_temperature=tau)).weights.numpy()
    e = np.exp(stats.losses.numpy() / tau)
    np.testing.assert_allclose(w, e / e.sum(), rtol=1e-12)


def test_robust_graph_handles_extreme_losses():
    # Losses 1000 apart at τ = 1: weights underflow to 0, nothing may turn NaN.
    stats = random_stats(4, seed=5)
    stats.losses = torch.tensor([0.0, 1000.0, 3.0, 2000.0], dtype=torch.float64)
    result = solve_domain_weights(stats, settings("robust", 1.0))
    assert_on_simplex(result.weights, 4)
    assert result.weights[3] > 0.999 and np.isfinite(result.value)


# --- alignment: a direct numpy re-implementation of the fixed point -------------------------------


def numpy_alignment(z: np.ndarray, iters: int) -> np.ndarray:
    m = len(z)
    w = np.ones(m) / m
    for _ in range(iters):
        g = w @ z
        cos = np.array([
            z[j] @ g / (np.linalg.norm(z[j]) * np.linalg.norm(g))
            if np.linalg.norm(z[j]) > 0 and np.linalg.norm(g) > 0 else 0.0
            for j in range(m)
        ])
        new = np.maximum(cos, 0.0)
        if new.sum() == 0:
            break
        w = new / new.sum()
    return w


def alignment_cos(z, w):
    g = w @ z
    ng = np.linalg.norm(g)
    return np.array([z[j] @ g / (np.linalg.norm(z[j]) * ng) if ng > 0 else 0.0 for j in range(len(z))])


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("iters", [1, 3, 10])
def test_alignment_matches_numpy_fixed_point(m, iters):
    stats = random_stats(m, seed=7 * m)
    result = solve_domain_weights(stats, settings("alignment", alignment_iters=iters))
    z = stats.centroids.numpy()
    w_ref = numpy_alignment(z, iters)
    np.testing.assert_allclose(result.weights.numpy(), w_ref, atol=1e-12)
    assert result.value == pytest.approx(float(w_ref @ alignment_cos(z, w_ref)), rel=1e-10)


@pytest.mark.parametrize("m", SIZES)
def test_alignment_reaches_fixed_point(m):
    stats = random_stats(m, seed=11 * m)
    w = solve_domain_weights(stats, settings("alignment", alignment_iters=300)).weights.numpy()
    cos = np.maximum(alignment_cos(stats.centroids.numpy(), w), 0)
    np.testing.assert_allclose(w, cos / cos.sum(), atol=1e-9)


@pytest.mark.parametrize("m", SIZES)
@pytest.mark.parametrize("lam", [0.2, 2.0])
def test_alignment_graph_smoothing_matches_brute_force(m, lam):
    stats = random_stats(m, seed=13 * m)
    s = settings("alignment", lam, alignment_iters=10)
    z = stats.centroids.numpy()
    w_fp = numpy_alignment(z, 10)
    lap = np_laplacian(z)
    bf_w, bf_f = brute_force(lambda w: float(0.5 * np.sum((w - w_fp) ** 2) + lam * w @ lap @ w), m, seed=m)
    result = solve_domain_weights(stats, s)
    w = result.weights.numpy()
    assert_on_simplex(result.weights, m)
    assert 0.5 * np.sum((w - w_fp) ** 2) + lam * w @ lap @ w <= bf_f + 1e-7 * max(1.0, bf_f)
    np.testing.assert_allclose(w, bf_w, atol=1e-4)
    assert result.value == pytest.approx(float(w @ alignment_cos(z, w) - lam * w @ lap @ w), rel=1e-10)


# ---------------------------------------------------------------------------------------------------
# 2. Always on the simplex, also in edge cases
# ---------------------------------------------------------------------------------------------------

ALL = ("uncertainty", "variance", "robust", "alignment")


def edge_cases():
    z = torch.randn(5, K, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    yield "one domain", domain_statistics(z, torch.rand(5, dtype=torch.float64), torch.zeros(5, dtype=torch.long))
    yield "all singletons (σ²=0)", domain_statistics(z, torch.rand(5, dtype=torch.float64), torch.arange(5))
    zero = torch.zeros(6, K, dtype=torch.float64)
    yield "zero centroids", domain_statistics(zero, torch.rand(6, dtype=torch.float64), torch.arange(6) % 3)
    same = z[:1].repeat(6, 1)
    yield "identical centroids", domain_statistics(same, torch.rand(6, dtype=torch.float64), torch.arange(6) % 3)
    opposite = torch.cat([z[:1], -z[:1]])
    yield "opposite centroids", domain_statistics(opposite, torch.ones(2, dtype=torch.float64), torch.arange(2))
    mixed = torch.cat([zero[:2], z[:2]])
    yield "some zero centroids", domain_statistics(mixed, torch.rand(4, dtype=torch.float64), torch.arange(4))


@pytest.mark.parametrize("objective", ALL)
@pytest.mark.parametrize("lam", [0.0, 1.0])
@pytest.mark.parametrize("gamma", [0.0, 0.25])
def test_weights_on_simplex_in_edge_cases(objective, lam, gamma):
    for name, stats in edge_cases():
        result = solve_domain_weights(stats, settings(objective, lam, uniform_mix=gamma))
        m = stats.num_domains
        assert_on_simplex(result.weights, m)
        assert np.isfinite(result.value), name
        if m == 1:
            assert result.weights.tolist() == [1.0]


@pytest.mark.parametrize("objective", ALL)
@pytest.mark.parametrize("m", SIZES)
def test_weights_on_simplex_random(objective, m):
    for lam in (0.0, 0.5):
        result = solve_domain_weights(random_stats(m, seed=m + 1), settings(objective, lam))
        assert_on_simplex(result.weights, m)


def test_singletons_give_uniform_uncertainty_weights():
    z = torch.randn(4, K, dtype=torch.float64)
    stats = domain_statistics(z, torch.rand(4, dtype=torch.float64), torch.arange(4))
    for lam in (0.0, 1.0):
        w = solve_domain_weights(stats, settings("uncertainty", lam)).weights
        torch.testing.assert_close(w, torch.full((4,), 0.25, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("objective", ALL)
def test_uniform_mix(objective):
    stats = random_stats(5, seed=21)
    base = solve_domain_weights(stats, settings(objective)).weights
    mixed = solve_domain_weights(stats, settings(objective, uniform_mix=0.3))
    torch.testing.assert_close(mixed.weights, 0.7 * base + 0.3 / 5, rtol=0, atol=1e-13)
    full = solve_domain_weights(stats, settings(objective, uniform_mix=1.0)).weights
    torch.testing.assert_close(full, torch.full((5,), 0.2, dtype=torch.float64), rtol=0, atol=1e-15)


def test_value_is_at_mixed_weights():
    stats = random_stats(5, seed=22)
    s = settings("uncertainty", 0.5, uniform_mix=0.4)
    result = solve_domain_weights(stats, s)
    f = uncertainty_f(np_stats(stats), s)
    assert result.value == pytest.approx(f(result.weights.numpy()), rel=1e-12)


# ---------------------------------------------------------------------------------------------------
# 3. uncertainty with λ = 0: the closed form, ordered inversely to σ²
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", SIZES)
def test_uncertainty_closed_form_and_order(m):
    stats = random_stats(m, seed=31 * m)
    s = settings("uncertainty", uncertainty_eps=0.2)
    w = solve_domain_weights(stats, s).weights.numpy()
    s2 = stats.sigma2.numpy()
    assert len(np.unique(s2)) == m
    inv = 1.0 / (s2 + 0.2 * s2.mean())
    np.testing.assert_allclose(w, inv / inv.sum(), rtol=1e-13)
    order = np.argsort(s2)
    assert np.all(np.diff(w[order]) < 0)


# ---------------------------------------------------------------------------------------------------
# 4. The domain graph
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("m", SIZES)
def test_laplacian_properties(m):
    z = random_stats(m, seed=41 * m).centroids
    z[0] = 0.0  # a zero centroid: no edges, no NaN
    A, L = domain_graph_laplacian(z)
    assert A.dtype == L.dtype == torch.float64
    assert torch.equal(A, A.T) and torch.equal(L, L.T)
    assert (A >= 0).all() and (torch.diag(A) == 0).all() and (A[0] == 0).all()
    torch.testing.assert_close(L.sum(dim=1), torch.zeros(m, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.linalg.eigvalsh(L).min() >= -1e-12
    np.testing.assert_allclose(L.numpy(), np_laplacian(z.numpy()), atol=1e-14)


def test_laplacian_by_hand():
    z = torch.tensor([[1.0, 0.0], [1.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    A, L = domain_graph_laplacian(z)
    c = 1 / np.sqrt(2)
    np.testing.assert_allclose(A.numpy(), [[0, c, 0], [c, 0, 0], [0, 0, 0]], atol=1e-15)
    np.testing.assert_allclose(L.numpy(), [[c, -c, 0], [-c, c, 0], [0, 0, 0]], atol=1e-15)


# ---------------------------------------------------------------------------------------------------
# 5. Projection onto the simplex
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(6))
def test_project_to_simplex_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    m = int(rng.integers(1, 12))
    v = rng.normal(size=m) * rng.uniform(0.1, 5.0)
    w = project_to_simplex(torch.from_numpy(v))
    assert_on_simplex(w, m)
    bf_w, _ = brute_force(lambda x: float(np.sum((x - v) ** 2)), m, seed=seed, starts=10)
    np.testing.assert_allclose(w.numpy(), bf_w, atol=1e-6)


def test_project_to_simplex_by_hand():
    torch.testing.assert_close(project_to_simplex(torch.tensor([0.2, 0.3, 0.5])),
                               torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64))
    torch.testing.assert_close(project_to_simplex(torch.tensor([2.0, 0.0])),
                               torch.tensor([1.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(project_to_simplex(torch.tensor([1.0, 1.0, -5.0])),
                               torch.tensor([0.5, 0.5, 0.0], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------
# 6. The registry
# ---------------------------------------------------------------------------------------------------


def test_unknown_objective_names_the_known_ones():
    s = DoGraphSettings(objective="nonsense")  # not validated, as a custom objective would be
    with pytest.raises(ValueError) as err:
        solve_domain_weights(random_stats(3, seed=0), s)
    for name in ALL:
        assert name in str(err.value)


def test_custom_solver_is_used(monkeypatch):
    calls = []

    def first_domain_only(stats, settings):
        calls.append(stats.num_domains)
        w = torch.zeros(stats.num_domains, dtype=torch.float64)
        w[0] = 1.0
        return ObjectiveResult(w, 42.0)

    monkeypatch.setitem(OBJECTIVE_SOLVERS, "first", first_domain_only)
    result = solve_domain_weights(random_stats(4, seed=1), DoGraphSettings(objective="first", uniform_mix=0.2))
    assert calls == [4]
    torch.testing.assert_close(result.weights, torch.tensor([0.85, 0.05, 0.05, 0.05], dtype=torch.float64))
    assert result.value == 42.0


def test_custom_solver_off_simplex_is_rejected(monkeypatch):
    def nan_weights(stats, settings):
        return ObjectiveResult(torch.full((stats.num_domains,), float("nan")), 0.0)

    def unnormalized(stats, settings):
        return ObjectiveResult(torch.ones(stats.num_domains), 0.0)

    for name, solver in (("nan", nan_weights), ("unnormalized", unnormalized)):
        monkeypatch.setitem(OBJECTIVE_SOLVERS, name, solver)
        with pytest.raises(ValueError, match="off the simplex"):
            solve_domain_weights(random_stats(3, seed=2), DoGraphSettings(objective=name))


def test_qp_fallback_path(monkeypatch):
    # Force the first active-set run to report no convergence: the FISTA fallback and second polish
    # must still return the exact optimum.
    from hf_dograph import simplex as objectives

    real = objectives._active_set_simplex
    calls = []

    def first_fails(q, c, w0, max_iter):
        calls.append(1)
        return (w0, False) if len(calls) == 1 else real(q, c, w0, max_iter)

    monkeypatch.setattr(objectives, "_active_set_simplex", first_fails)
    stats = random_stats(6, seed=9)
    s = settings("variance", 0.5)
    w = solve_domain_weights(stats, s).weights.numpy()
    assert len(calls) == 2
    f = variance_f(np_stats(stats), s)
    bf_w, bf_f = brute_force(f, 6, seed=1)
    assert f(w) <= bf_f + 1e-7 * max(1.0, abs(bf_f))
    np.testing.assert_allclose(w, bf_w, atol=1e-4)


def test_qp_singular_hessian():
    # Two zero centroids: their coordinates do not enter the objective at all (Q has e_j − e_k in its
    # null space, a flat direction on the simplex), so the minimizer is not unique; the minimum is.
    stats = random_stats(5, seed=12)
    stats.centroids[1] = 0.0
    stats.centroids[3] = 0.0
    for lam in (0.0, 0.5):
        s = settings("variance", lam)
        result = solve_domain_weights(stats, s)
        assert_on_simplex(result.weights, 5)
        f = variance_f(np_stats(stats), s)
        _, bf_f = brute_force(f, 5, seed=2)
        assert f(result.weights.numpy()) <= bf_f + 1e-7 * max(1.0, abs(bf_f))


@pytest.mark.parametrize("seed", range(5))
def test_qp_solver_low_rank(seed):
    # Low-rank Q with a linear term: the optimum sits on a face along flat directions, which the
    # active-set method reaches by following zero-curvature rays.
    from hf_dograph.simplex import _active_set_simplex
    from hf_dograph.simplex import solve_simplex_qp as _solve_simplex_qp

    rng = np.random.default_rng(seed)
    m = 6
    b = rng.normal(size=(m, 1 + seed % 2))
    q, c = b @ b.T, rng.normal(size=m)
    f = lambda x: float(0.5 * x @ q @ x + c @ x)  # noqa: E731
    _, bf_f = brute_force(f, m, seed=seed)
    # From the uniform point (no warm start) the first moves are along zero-curvature rays.
    cold, converged = _active_set_simplex(q, c, np.full(m, 1.0 / m), max_iter=200)
    assert converged
    for w in (cold, _solve_simplex_qp(q, c, 500)):
        assert (w >= 0).all() and abs(w.sum() - 1) <= 1e-12
        assert f(w) <= bf_f + 1e-9 * max(1.0, abs(bf_f))
