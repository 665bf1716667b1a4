"""Smoothed-aggregation AMG: the setup's invariants, the cycle's symmetry,
answers against dense solves, CG iterations flat in the grid size, jit / vmap /
grad, bad input (its honesty on adversarial systems: tests/test_honest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.sparse as sp
from jax.experimental import sparse
from jax.test_util import check_grads

import iterjax as ij
from iterjax.gallery import Poisson2D, lognormal_coefficient
from iterjax.linear import MultigridSolver, SmoothedAggregation, from_scipy
from iterjax.linear.amg import Ell, aggregate, strength, tentative


def darcy(n, sigma=1.0, seed=0):
    k = lognormal_coefficient(n, sigma, 4, seed) if sigma else np.ones((n, n))
    return Poisson2D(jnp.asarray(k))


def graph_laplacian(n, seed, shift=1e-2):
    """A random sparse SPD matrix: a weighted random graph's Laplacian plus a
    small shift (no grid structure, rows of uneven length)."""
    rng = np.random.default_rng(seed)
    W = sp.random(n, n, density=4 / n, random_state=rng)
    W = W + W.T
    L = sp.diags(np.asarray(W.sum(axis=1)).ravel()) - W
    return sp.csr_matrix(L + shift * sp.identity(n))


def test_the_setup_partitions_the_nodes_and_builds_galerkin_levels():
    A = darcy(31).assemble()
    owner, count = aggregate(strength(A, 0.0))
    # every node in exactly one aggregate, each aggregate connected in A's graph
    assert owner.min() == 0 and owner.max() == count - 1
    assert np.all(np.bincount(owner) >= 1)
    for agg in range(0, count, 7):
        members = np.flatnonzero(owner == agg)
        sub = sp.csgraph.connected_components(A[members][:, members])[0]
        assert sub == 1
    T, norms = tentative(owner, count, np.ones(A.shape[0]))
    np.testing.assert_allclose((T.T @ T).toarray(), np.eye(count), atol=1e-14)
    np.testing.assert_allclose(T @ norms, np.ones(A.shape[0]), atol=1e-14)
    amg = SmoothedAggregation().setup(A)
    assert amg.sizes[0] == 961 and amg.sizes[-1] <= amg.max_coarse
    # each coarse operator is Pᵀ A P of the one above
    fine = amg.levels[0]
    P = _dense(fine.P, amg.sizes[1])
    coarse = _dense(amg.levels[1].A, amg.sizes[1])
    np.testing.assert_allclose(coarse, P.T @ A.toarray() @ P, atol=1e-9)
    # P is T smoothed by one damped Jacobi step on A
    rho = float(fine.rho)
    smoother = np.eye(961) - 4 / 3 / rho * (A.toarray() / A.diagonal()[:, None])
    np.testing.assert_allclose(P, smoother @ T.toarray(), atol=1e-12)
    assert 1.0 < amg.operator_complexity < 1.5


def _dense(ell, columns):
    rows = ell.columns.shape[0]
    M = np.zeros((rows, columns))
    np.add.at(
        M,
        (np.repeat(np.arange(rows), ell.columns.shape[1]), np.ravel(ell.columns)),
        np.ravel(ell.values),
    )
    return M


def test_ell_products_are_scipys():
    A = graph_laplacian(50, 0)
    x = np.random.default_rng(1).normal(size=50)
    np.testing.assert_allclose(Ell.from_scipy(A, jnp.float64) @ x, A @ x, atol=1e-12)


@pytest.mark.parametrize(
    "options",
    [{}, {"cycle": "W"}, {"smoother": "jacobi", "degree": 1}, {"degree": 3}],
    ids=["V-chebyshev", "W", "jacobi", "degree3"],
)
def test_the_cycle_is_symmetric_positive_definite(options):
    A = darcy(15, sigma=2.0).assemble()
    amg = SmoothedAggregation(**options).setup(A)
    apply, cost, per_apply = amg.build(from_scipy(A), jnp.ones(225))
    M = np.asarray(jax.vmap(apply)(jnp.eye(225)))
    np.testing.assert_allclose(M, M.T, atol=1e-12 * np.abs(M).max())
    assert np.linalg.eigvalsh((M + M.T) / 2)[0] > 0
    assert cost == 0 and per_apply >= 2 * amg.degree


def _cg_steps(amg, A, b, rtol=1e-8):
    x, stats = ij.CG(preconditioner=amg, rtol=rtol).solve_with_stats(A, b)
    per_apply = amg.work
    return x, stats, (int(stats.num_matvecs) - per_apply) // (1 + per_apply)


def test_cg_with_amg_needs_iterations_flat_in_the_grid_size():
    steps = {}
    for n in (15, 31, 63):
        op = darcy(n)
        b = jnp.ones((n, n))
        x, stats, steps[n] = _cg_steps(SmoothedAggregation().setup(op), op, b)
        assert bool(stats.converged)
        assert float(jnp.linalg.norm(b - op(x))) <= 1e-8 * float(jnp.linalg.norm(b))
    # pyamg's SA-AMG + CG (Gauss-Seidel smoothing) takes 10 at 63² and 13 at 255²
    # (benchmarks/linear.py); ours grow by at most a few steps a doubling
    assert max(steps.values()) <= 15 and max(steps.values()) - min(steps.values()) <= 4
    # at 63², products counted with the cycles' work: measured 6.6x fewer
    _, plain = ij.CG(rtol=1e-8).solve_with_stats(op, b)
    assert int(plain.num_matvecs) >= 5 * int(stats.num_matvecs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_answers_on_unstructured_matrices_are_dense_solves(seed):
    A = graph_laplacian(300, seed)
    b = jnp.asarray(np.random.default_rng(seed).normal(size=300))
    exact = np.linalg.solve(A.toarray(), np.asarray(b))
    amg = SmoothedAggregation().setup(A)
    scale = np.abs(exact).max()
    for solver in (
        ij.CG(preconditioner=amg, rtol=1e-12),
        MultigridSolver(amg, rtol=1e-12, max_steps=500),
    ):
        x, stats = solver.solve_with_stats(from_scipy(A), b)
        assert bool(stats.converged), solver
        np.testing.assert_allclose(x, exact, atol=1e-8 * scale)


def test_without_setup_it_sets_itself_up_from_a_concrete_operator():
    op = darcy(31)
    b = jnp.ones((31, 31))
    ready = SmoothedAggregation().setup(op)
    want, _ = ij.CG(preconditioner=ready, rtol=1e-10).solve_with_stats(op, b)
    solver = ij.CG(preconditioner=SmoothedAggregation(), rtol=1e-10)
    for operator in (
        op,
        from_scipy(op.assemble()),
        jnp.asarray(op.assemble().todense()),
    ):
        rhs = b if operator is op else b.reshape(-1)
        x, stats = jax.jit(lambda r, A=operator: solver.solve_with_stats(A, r))(rhs)
        assert bool(stats.converged)
        np.testing.assert_allclose(np.reshape(x, (31, 31)), want, atol=1e-12)


def test_jit_and_vmap_over_right_hand_sides_and_over_the_hierarchy():
    A = graph_laplacian(200, 3)
    amg = SmoothedAggregation().setup(A)
    bs = jnp.asarray(np.random.default_rng(0).normal(size=(4, 200)))
    exact = np.linalg.solve(A.toarray(), np.asarray(bs).T).T
    matrix = from_scipy(A)

    @jax.jit
    def solve(amg, b):  # the hierarchy as an argument, not baked in
        return ij.CG(preconditioner=amg, rtol=1e-12).solve(matrix, b)

    xs = jax.vmap(solve, in_axes=(None, 0))(amg, bs)
    np.testing.assert_allclose(xs, exact, atol=1e-8 * np.abs(exact).max())
    # the hierarchy of another matrix of the same sparsity pattern (2A: a
    # valid preconditioner for A) reuses the compilation
    solve(amg, bs[0])
    x = solve(SmoothedAggregation().setup(A * 2.0), bs[0])
    assert solve._cache_size() == 1
    np.testing.assert_allclose(x, exact[0], atol=1e-8 * np.abs(exact).max())


def test_gradients_through_an_amg_preconditioned_cg_solve():
    # the implicit adjoint: the transposed solve, with the same fixed M
    A = graph_laplacian(60, 4, shift=1.0)
    amg = SmoothedAggregation(max_coarse=5).setup(A)
    base = from_scipy(A)
    b = jnp.asarray(np.random.default_rng(2).normal(size=60))
    solver = ij.CG(preconditioner=amg, rtol=1e-13)

    def loss(values, b):
        x = solver.solve(sparse.BCOO((values, base.indices), shape=A.shape), b)
        return jnp.sum(jnp.sin(x))

    def dense_loss(values, b):
        dense = sparse.BCOO((values, base.indices), shape=A.shape).todense()
        return jnp.sum(jnp.sin(jnp.linalg.solve(dense, b)))

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(base.data, b)
    want = jax.grad(dense_loss, argnums=(0, 1))(base.data, b)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-9 * float(jnp.abs(w).max()))
    check_grads(jax.jit(lambda b: loss(base.data, b)), (b,), order=1, modes="rev")


def test_nan_in_gives_nan_out_and_not_converged():
    op = darcy(15)
    amg = SmoothedAggregation().setup(op)
    b = jnp.ones((15, 15)).at[3, 4].set(jnp.nan)
    for solver in (ij.CG(preconditioner=amg), MultigridSolver(amg)):
        x, stats = solver.solve_with_stats(op, b)
        assert bool(jnp.all(jnp.isnan(x))) and not bool(stats.converged)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="theta"):
        SmoothedAggregation(theta=1.0)
    with pytest.raises(ValueError, match="smoother"):
        SmoothedAggregation(smoother="gauss_seidel")
    with pytest.raises(ValueError, match="cycle"):
        SmoothedAggregation(cycle="F")
    with pytest.raises(ValueError, match="degree"):
        SmoothedAggregation(degree=0)
    with pytest.raises(TypeError, match="`A` must be"):
        SmoothedAggregation().setup(lambda v: v)
    with pytest.raises(ValueError, match="square"):
        SmoothedAggregation().setup(sp.random(4, 5, density=0.5))
    with pytest.raises(ValueError, match="positive diagonal"):
        SmoothedAggregation().setup(-graph_laplacian(50, 0))
    A = graph_laplacian(50, 0)
    amg = SmoothedAggregation().setup(A)
    with pytest.raises(ValueError, match="set up for 50 unknowns, b has 40"):
        ij.CG(preconditioner=amg).solve(jnp.eye(40), jnp.ones(40))
    matrix = from_scipy(A)
    traced = jax.jit(
        lambda data, b: ij.CG(preconditioner=SmoothedAggregation()).solve(
            sparse.BCOO((data, matrix.indices), shape=A.shape), b
        )
    )
    with pytest.raises(ValueError, match=r"call \.setup\(A\)"):
        traced(matrix.data, jnp.ones(50))
