"""fixed_point_chain: warm-started chains of related problems in a lax.scan."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import fd_directional, tanh_cell

import iterjax as ij


def chain_problem(T=100):
    """A tanh DEQ cell z = tanh(W z + x_t) along a smooth path of inputs x_t."""
    _, (w, x), y0 = tanh_cell()
    t = jnp.linspace(0.0, T / 100, T)[:, None]
    xs = x[None] * jnp.cos(t) + 0.5 * jnp.sin(3 * t)
    fn = lambda y, w, x: jnp.tanh(w @ y + x)
    return fn, w, xs, y0


def test_warm_starts_give_the_same_solutions_in_fewer_steps():
    fn, w, xs, y0 = chain_problem()
    kw = dict(atol=1e-8, max_steps=500)
    warm = ij.fixed_point_chain(fn, y0, xs, w, **kw)
    cold = ij.fixed_point_chain(fn, y0, xs, w, warm_start=False, **kw)
    assert bool(jnp.all(warm.converged)) and bool(jnp.all(cold.converged))
    np.testing.assert_allclose(warm.value, cold.value, atol=1e-7)
    # each problem against its own solve
    for t in [0, 17, 99]:
        ref = ij.fixed_point(lambda y, a: fn(y, w, a), y0, xs[t], **kw).value
        np.testing.assert_allclose(warm.value[t], ref, atol=1e-7)
    # linear convergence: warm starts save the steps of the distance they skip
    assert int(warm.num_steps.sum()) < 0.85 * int(cold.num_steps.sum())
    # cold: every problem starts from y0; warm: only the first does
    assert int(warm.num_steps[0]) == int(cold.num_steps[0])


def test_implicit_gradient_through_the_chain(getkey):
    fn, w, xs, y0 = chain_problem(T=12)
    c = jnp.linspace(-1.0, 1.0, y0.shape[0])

    def loss(w, xs):
        sols = ij.fixed_point_chain(fn, y0, xs, w, atol=1e-12, max_steps=500)
        return jnp.sum(jnp.sin(sols.value) @ c)

    gw, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, xs)
    v = jax.random.normal(getkey(), w.shape)
    np.testing.assert_allclose(
        jnp.vdot(gw, v), fd_directional(lambda w: loss(w, xs), w, v), rtol=1e-6
    )
    u = jax.random.normal(getkey(), xs.shape)
    np.testing.assert_allclose(
        jnp.vdot(gx, u), fd_directional(lambda xs: loss(w, xs), xs, u), rtol=1e-6
    )


def test_real_time_iteration_differentiates_through_warm_starts(getkey):
    # Two steps per problem: the answers depend on the starts, and the unrolled
    # adjoint's gradient (through the chain of starts) matches finite differences.
    fn, w, xs, y0 = chain_problem(T=10)

    def loss(w):
        sols = ij.fixed_point_chain(
            fn, y0, xs, w, max_steps=2, solver=ij.Picard(), adjoint=ij.UnrolledAdjoint()
        )
        return jnp.sum(sols.value[-1] ** 2)

    v = jax.random.normal(getkey(), w.shape)
    np.testing.assert_allclose(
        jnp.vdot(jax.grad(loss)(w), v), fd_directional(loss, w, v), rtol=1e-6
    )


def test_chain_under_vmap():
    fn, w, xs, y0 = chain_problem(T=20)
    ws = jnp.stack([w, 0.5 * w])
    solve = lambda w: ij.fixed_point_chain(fn, y0, xs, w, atol=1e-10)
    out = jax.vmap(solve)(ws)
    for i in range(2):
        one = solve(ws[i])
        np.testing.assert_allclose(out.value[i], one.value, atol=1e-12)
        np.testing.assert_array_equal(out.num_steps[i], one.num_steps)


@pytest.mark.parametrize(
    "xs, match",
    [
        ({"a": jnp.ones((3, 2)), "b": jnp.ones((4, 2))}, "same leading axis"),
        (jnp.array(1.0), "same leading axis"),
        ({}, "no arrays"),
    ],
)
def test_bad_xs(xs, match):
    fn = lambda y, a, x: 0.5 * y
    with pytest.raises(ValueError, match=match):
        ij.fixed_point_chain(fn, jnp.zeros(2), xs)
