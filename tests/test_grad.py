"""Every solver under grad (implicit adjoint) against central finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ALL_SOLVERS, IDS, PROBLEMS, fd_directional, random_like, tree_dot

import iterjax as ij


@pytest.mark.parametrize("problem", ["tanh", "pytree"])
@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=IDS)
def test_grad_matches_finite_differences(solver, problem, getkey):
    fn, args, y0 = PROBLEMS[problem]()
    weights = random_like(getkey(), y0)

    def loss(a):
        sol = ij.fixed_point(fn, y0, a, solver=solver, atol=1e-13, max_steps=1000)
        return tree_dot(weights, jax.tree_util.tree_map(jnp.sin, sol.value))

    loss = jax.jit(loss)
    grad = jax.jit(jax.grad(loss))(args)
    v = random_like(getkey(), args)
    np.testing.assert_allclose(
        tree_dot(grad, v), fd_directional(loss, args, v), rtol=1e-6
    )


def test_grad_through_root():
    F = lambda y, a: y**3 + a[0] * y - a[1]
    a = jnp.array([1.0, 2.0])
    y = lambda a: ij.root(F, jnp.array(1.0), a, atol=1e-14).value
    # Implicit function theorem by hand: dy/da = -(∂F/∂y)^{-1} ∂F/∂a.
    ys = y(a)
    expected = -jnp.array([ys, -1.0]) / (3 * ys**2 + a[0])
    np.testing.assert_allclose(jax.grad(y)(a), expected, rtol=1e-10)


def test_grad_of_closed_over_parameters():
    fn, (w, x), y0 = PROBLEMS["tanh"]()

    def loss(w, x):
        closure = lambda y, _: jnp.tanh(w @ y + x)  # w and x reach fn by closure only
        return jnp.sum(ij.fixed_point(closure, y0, None, atol=1e-13).value ** 2)

    def loss_args(w, x):
        return jnp.sum(ij.fixed_point(fn, y0, (w, x), atol=1e-13).value ** 2)

    g1 = jax.grad(loss, argnums=(0, 1))(w, x)
    g2 = jax.grad(loss_args, argnums=(0, 1))(w, x)
    np.testing.assert_allclose(g1[0], g2[0], atol=1e-10)
    np.testing.assert_allclose(g1[1], g2[1], atol=1e-10)


def test_second_order_hessian_vector_product_unrolled(getkey):
    # Unrolled iterations are ordinary JAX code: grad-of-grad works.
    fn = lambda y, a: 0.5 * jnp.tanh(y + a)
    a = jax.random.normal(getkey(), (3,))
    loss = lambda a: jnp.sum(
        ij.fixed_point(
            fn,
            jnp.zeros(3),
            a,
            solver=ij.Picard(),
            atol=1e-14,
            max_steps=80,
            adjoint=ij.UnrolledAdjoint(),
        ).value
    )
    h = jax.jit(jax.hessian(loss))(a)
    fd = jax.jit(jax.jacfwd(jax.grad(loss)))(a)
    np.testing.assert_allclose(h, fd, atol=1e-8)
    np.testing.assert_allclose(h, h.T, atol=1e-8)


def test_float32_gradient_dtype_and_accuracy():
    fn, args, y0 = PROBLEMS["tanh"]()
    args32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), args)

    def loss(a, y0):
        return jnp.sum(ij.fixed_point(fn, y0, a, atol=1e-6).value ** 2)

    g32 = jax.jit(jax.grad(loss))(args32, y0.astype(jnp.float32))
    g64 = jax.jit(jax.grad(loss))(args, y0)
    assert g32[0].dtype == jnp.float32
    np.testing.assert_allclose(g32[0], g64[0], atol=1e-4)
    np.testing.assert_allclose(g32[1], g64[1], atol=1e-4)
