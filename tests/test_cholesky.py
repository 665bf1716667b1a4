"""Incomplete Cholesky on grids: the factor against dense algebra (IC(0)'s
defining property, exact Cholesky in 1-D, the wavefront solves), CG with it
against dense solves, jit / vmap / grad, NaN and breakdown, bad input (its
honesty on adversarial systems: tests/test_honest.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import iterjax as ij
from iterjax.gallery import Poisson2D, Poisson3D, lognormal_coefficient
from iterjax.linear import GridFactor, IncompleteCholesky
from iterjax.linear.cholesky import incomplete_cholesky, star

SECOND_DIFFERENCE = np.diag(np.full(9, 2.0)) - np.eye(9, k=1) - np.eye(9, k=-1)


def operator(ndim, n, seed=0):
    """A grid operator and its dense matrix: 1-D a second difference, 2-D / 3-D
    Darcy with a rough field."""
    if ndim == 1:
        return (lambda u: jnp.asarray(SECOND_DIFFERENCE[:n, :n]) @ u), (
            SECOND_DIFFERENCE[:n, :n]
        )
    k = lognormal_coefficient(n, 1.5, 2, seed, ndim)
    op = (Poisson2D if ndim == 2 else Poisson3D)(jnp.asarray(k))
    return op, op.assemble().toarray()


def dense(fn, shape):
    """The matrix of a linear grid function, its columns vmapped."""
    size = int(np.prod(shape))
    basis = jnp.eye(size).reshape((size, *shape))
    return np.asarray(jax.vmap(fn)(basis)).reshape(size, size).T


@pytest.mark.parametrize("ndim,n", [(1, 9), (2, 7), (3, 4)])
def test_ic0_matches_a_on_its_pattern_and_the_solves_are_dense_solves(ndim, n):
    op, A = operator(ndim, n)
    factor = incomplete_cholesky(*star(op, n, jnp.float64, ndim))
    shape = (n,) * ndim
    L = dense(factor.lower_matvec, shape)
    np.testing.assert_array_equal(L, np.tril(L))  # lower triangular, row-major
    assert np.all(np.diag(L) > 0)
    np.testing.assert_allclose(dense(factor.upper_matvec, shape), L.T, atol=1e-12)
    M = L @ L.T
    np.testing.assert_allclose(dense(factor, shape), M, rtol=1e-12, atol=1e-9)
    # IC(0): L has A's lower pattern and L Lᵀ equals A wherever A is nonzero
    np.testing.assert_array_equal(L != 0, np.tril(A) != 0)
    on = A != 0
    np.testing.assert_allclose(M[on], A[on], rtol=1e-12, atol=1e-12 * abs(A).max())
    if ndim == 1:  # a tridiagonal matrix has no fill-in: the exact Cholesky
        np.testing.assert_allclose(L, np.linalg.cholesky(A), atol=1e-13)
    r = np.random.default_rng(ndim).normal(size=shape)
    got = np.ravel(factor.solve(jnp.asarray(r)))
    np.testing.assert_allclose(got, np.linalg.solve(M, r.ravel()), rtol=1e-10)


def test_an_arbitrary_factor_applies_and_inverts_its_own_product():
    rng = np.random.default_rng(3)
    diag = jnp.asarray(rng.uniform(0.5, 2.0, (5, 5)))
    lower = jnp.asarray(rng.normal(size=(2, 5, 5)))  # off-grid entries ignored
    factor = GridFactor(diag, lower)
    M = dense(factor, (5, 5))
    np.testing.assert_allclose(M, M.T, atol=1e-12)
    assert np.linalg.eigvalsh(M).min() > 0
    r = rng.normal(size=(5, 5))
    np.testing.assert_allclose(
        np.ravel(factor.solve(jnp.asarray(r))), np.linalg.solve(M, r.ravel()), rtol=1e-9
    )


@pytest.mark.parametrize("ndim,n", [(2, 31), (3, 9)])
def test_cg_with_ic0_solves_darcy_in_fewer_steps_than_jacobi_cg(ndim, n):
    op, A = operator(ndim, n, seed=1)
    b = jnp.ones((n,) * ndim)
    want = np.linalg.solve(A, np.ravel(b))
    steps = {}
    for name, pre in [("ic", IncompleteCholesky()), ("jacobi", None)]:
        pre = pre or ij.linear.JacobiPreconditioner()
        x, stats = jax.jit(
            lambda b, pre=pre: ij.CG(preconditioner=pre, rtol=1e-10).solve_with_stats(
                op, b
            )
        )(b)
        assert bool(stats.converged)
        np.testing.assert_allclose(np.ravel(x), want, rtol=1e-7, atol=1e-9)
        steps[name] = int(stats.num_matvecs) - (3**ndim if name == "ic" else 0)
    assert steps["ic"] < 0.6 * steps["jacobi"], steps


def test_ic_preconditions_exactly_a_tridiagonal_system():
    op, A = operator(1, 9)
    x, stats = ij.CG(preconditioner=IncompleteCholesky()).solve_with_stats(
        op, jnp.ones(9)
    )
    assert bool(stats.converged) and int(stats.num_matvecs) == 3 + 1  # probe + 1
    np.testing.assert_allclose(x, np.linalg.solve(A, np.ones(9)), rtol=1e-12)


def test_jit_and_vmap_over_right_hand_sides_and_coefficient_fields():
    ks = jnp.asarray(np.stack([lognormal_coefficient(15, 1.0, 4, s) for s in range(3)]))
    bs = jnp.asarray(np.random.default_rng(0).normal(size=(3, 15, 15)))
    solver = ij.CG(preconditioner=IncompleteCholesky(), rtol=1e-11)
    solve = jax.jit(jax.vmap(lambda k, b: solver.solve(Poisson2D(k), b)))
    xs = solve(ks, bs)
    for k, b, x in zip(ks, bs, xs, strict=True):
        A = Poisson2D(k).assemble().toarray()
        want = np.linalg.solve(A, np.ravel(b))
        np.testing.assert_allclose(np.ravel(x), want, atol=1e-8 * abs(want).max())


def test_gradients_through_an_ic_preconditioned_cg_solve():
    n = 7
    k0 = jnp.asarray(lognormal_coefficient(n, 1.0, 2, 4))
    b0 = jnp.asarray(np.random.default_rng(1).normal(size=(n, n)))
    solver = ij.CG(preconditioner=IncompleteCholesky(), rtol=1e-13)

    def loss(k, b):
        return jnp.sum(jnp.sin(solver.solve(Poisson2D(k), b)))

    def dense_loss(k, b):
        # the same operator as a dense matrix, built column by column
        A = jax.vmap(lambda e: Poisson2D(k)(e.reshape(n, n)).ravel())(jnp.eye(n * n))
        return jnp.sum(jnp.sin(jnp.linalg.solve(A.T, b.ravel())))

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(k0, b0)
    want = jax.grad(dense_loss, argnums=(0, 1))(k0, b0)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-8 * float(jnp.abs(w).max()))
    check_grads(jax.jit(loss), (k0, b0), order=1, modes="rev")


def test_nan_in_gives_nan_out_and_a_breakdown_is_not_converged():
    op, _ = operator(2, 9)
    solver = ij.CG(preconditioner=IncompleteCholesky())
    x, stats = solver.solve_with_stats(op, jnp.ones((9, 9)).at[2, 3].set(jnp.nan))
    assert bool(jnp.all(jnp.isnan(x))) and not bool(stats.converged)
    # an indefinite operator (Poisson shifted past its smallest eigenvalue):
    # IC(0) meets a non-positive pivot, and CG says so
    shifted = lambda u: Poisson2D(jnp.ones((9, 9)))(u) - 5e3 * u
    x, stats = solver.solve_with_stats(shifted, jnp.ones((9, 9)))
    assert not bool(stats.converged)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="right-hand side must be an n\\^d grid"):
        ij.CG(preconditioner=IncompleteCholesky()).solve(
            lambda u: u, jnp.ones((2, 2, 2, 2))
        )
    with pytest.raises(ValueError, match="right-hand side must be an n\\^d grid"):
        ij.CG(preconditioner=IncompleteCholesky()).solve(lambda u: u, jnp.ones((3, 4)))
    with pytest.raises(ValueError, match="`lower` must have shape"):
        GridFactor(jnp.ones((4, 4)), jnp.ones((1, 4, 4)))
    with pytest.raises(ValueError, match="`diag` must be an n\\^d grid"):
        GridFactor(jnp.ones((4, 5)), jnp.ones((2, 4, 5)))
