"""Randomized block Kaczmarz: dense solves' answers on nonsymmetric and
symmetric indefinite (KKT) systems, a matrix or a function, jit / vmap / grad;
the sketched inexact Newton on an equality-constrained least-squares problem;
bad input. (Its honesty on adversarial systems: tests/test_honest.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import iterjax as ij
from iterjax.linear import BlockKaczmarz


def nonsymmetric(n=30, seed=0):
    rng = np.random.default_rng(seed)
    return jnp.asarray(np.eye(n) * 3 + rng.normal(size=(n, n)) / np.sqrt(n))


def kkt(n=20, m=5, seed=1):
    """[[H, Cᵀ], [C, 0]]: H SPD, C full row rank; symmetric indefinite."""
    rng = np.random.default_rng(seed)
    G = rng.normal(size=(n, n))
    H = G @ G.T / n + np.eye(n)
    C = rng.normal(size=(m, n))
    return jnp.asarray(np.block([[H, C.T], [C, np.zeros((m, m))]]))


@pytest.mark.parametrize("system", [nonsymmetric, kkt], ids=["nonsymmetric", "kkt"])
def test_matrix_and_function_give_the_dense_solve(system):
    A = system()
    b = jnp.asarray(np.random.default_rng(2).normal(size=A.shape[0]))
    exact = np.linalg.solve(A, b)
    solver = BlockKaczmarz(block=8, rtol=1e-10, max_epochs=5000)
    for operator in (A, lambda v: A @ v):
        x, stats = solver.solve_with_stats(operator, b)
        assert bool(stats.converged)
        assert float(jnp.linalg.norm(b - A @ x)) <= 1e-10 * float(jnp.linalg.norm(b))
        np.testing.assert_allclose(x, exact, atol=1e-7 * np.abs(exact).max())


def test_jit_vmap_and_grad_against_dense_solves():
    A = nonsymmetric(12, 3)
    bs = jnp.asarray(np.random.default_rng(4).normal(size=(3, 12)))
    solver = BlockKaczmarz(block=4, rtol=1e-12, max_epochs=5000)
    xs = jax.jit(jax.vmap(lambda b: solver.solve(A, b)))(bs)
    np.testing.assert_allclose(xs, np.linalg.solve(A, bs.T).T, atol=1e-9)

    loss = lambda A, b: jnp.sum(jnp.sin(solver.solve(A, b)))
    dense = lambda A, b: jnp.sum(jnp.sin(jnp.linalg.solve(A, b)))
    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(A, bs[0])
    want = jax.grad(dense, argnums=(0, 1))(A, bs[0])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-8 * float(jnp.abs(w).max()))
    check_grads(jax.jit(lambda b: loss(A, b)), (bs[0],), order=1, modes="rev")


def test_sketched_inexact_newton_on_constrained_least_squares():
    # min ½|M x - y|² subject to |x|² = 1 and Σx = 0.5: the KKT map of (x, λ)
    # is a root problem whose Jacobian is the symmetric indefinite Lagrangian
    # Newton matrix; Newton solves it inexactly by block Kaczmarz (the forcing
    # term tightening as the KKT residual falls) and agrees with Newton on
    # dense solves
    rng = np.random.default_rng(5)
    M, y = jnp.asarray(rng.normal(size=(30, 8))), jnp.asarray(rng.normal(size=30))
    f = lambda x: 0.5 * jnp.sum((M @ x - y) ** 2)
    c = lambda x: jnp.array([x @ x - 1.0, jnp.sum(x) - 0.5])
    lagrangian = lambda x, lam: f(x) + lam @ c(x)

    def kkt_map(z, _):
        x, lam = z
        return jax.grad(lagrangian)(x, lam), c(x)

    start = (jnp.full(8, 0.3), jnp.zeros(2))
    sketched = ij.Newton(BlockKaczmarz(block=4, max_epochs=500), forcing="superlinear")
    got = jax.jit(
        lambda z: ij.root(kkt_map, z, solver=sketched, atol=1e-10, max_steps=50)
    )(start)
    assert bool(got.converged)
    x, lam = got.value
    # the KKT conditions, recomputed
    assert float(jnp.max(jnp.abs(jax.grad(lagrangian)(x, lam)))) <= 1e-9
    assert float(jnp.max(jnp.abs(c(x)))) <= 1e-9
    # Newton with dense solves of the KKT system, from the same start
    flat = lambda z: jnp.concatenate(kkt_map((z[:8], z[8:]), None))
    newton = jax.jit(lambda z: z - jnp.linalg.solve(jax.jacfwd(flat)(z), flat(z)))
    z = jnp.concatenate(start)
    for _ in range(30):
        z = newton(z)
    np.testing.assert_allclose(x, z[:8], atol=1e-8)
    np.testing.assert_allclose(lam, z[8:], atol=1e-8)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="BlockKaczmarz.*block"):
        BlockKaczmarz(block=0)
    with pytest.raises(ValueError, match="BlockKaczmarz.*max_epochs"):
        BlockKaczmarz(max_epochs=0)
    with pytest.raises(ValueError, match="BlockKaczmarz.*rtol"):
        BlockKaczmarz(rtol=-1.0)
