"""iterjax.deq.DEQ: forward equals fixed_point, gradients match unrolled and finite
differences (float64), jit / vmap / grad / inside scan, warm starts, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import iterjax as ij
from iterjax.deq import DEQ

D = 6


class Cell(nnx.Module):
    """z -> tanh(W z + U x + b), a contraction for small W."""

    def __init__(self, rngs, scale=0.5):
        self.w = nnx.Linear(D, D, use_bias=False, param_dtype=jnp.float64, rngs=rngs)
        self.u = nnx.Linear(3, D, param_dtype=jnp.float64, rngs=rngs)
        self.scale = scale

    def __call__(self, z, x):
        return jnp.tanh(self.scale * self.w(z) + self.u(x))


def make(adjoint=ij.ImplicitAdjoint(), **kw):
    return DEQ(Cell(nnx.Rngs(0)), adjoint=adjoint, atol=1e-12, **kw)


X = jnp.linspace(-1.0, 1.0, 3)
Z0 = jnp.zeros(D)


def test_forward_is_the_fixed_point():
    deq = make()
    z, sol = deq(X, Z0, return_solution=True)
    assert bool(sol.converged) and int(sol.num_steps) > 3
    np.testing.assert_allclose(deq.cell(z, X), z, atol=1e-11)
    ref = ij.fixed_point(lambda z, _: deq.cell(z, X), Z0, None, atol=1e-12).value
    np.testing.assert_allclose(z, ref, atol=1e-11)


def loss(deq, x):
    return jnp.sum(jnp.sin(deq(x, Z0)))


def test_gradients_match_unrolled_and_finite_differences():
    g_implicit = nnx.grad(loss)(make(), X)
    g_unrolled = nnx.grad(loss)(make(ij.UnrolledAdjoint()), X)
    for a, b in zip(jax.tree.leaves(g_implicit), jax.tree.leaves(g_unrolled)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    # Central differences along a random direction in parameter space.
    deq = make()
    graphdef, params = nnx.split(deq)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    v = jax.random.normal(jax.random.key(1), flat.shape)
    f = lambda p: loss(nnx.merge(graphdef, unravel(p)), X)
    eps = 1e-6
    fd = (f(flat + eps * v) - f(flat - eps * v)) / (2 * eps)
    g = jax.flatten_util.ravel_pytree(g_implicit)[0]
    np.testing.assert_allclose(g @ v, fd, rtol=1e-5)
    # And with respect to the input.
    gx = jax.grad(lambda x: loss(make(), x))(X)
    e = jnp.eye(3)
    fdx = jnp.array(
        [
            (loss(make(), X + eps * e[i]) - loss(make(), X - eps * e[i])) / (2 * eps)
            for i in range(3)
        ]
    )
    np.testing.assert_allclose(gx, fdx, rtol=1e-5)


def test_jit_vmap_and_grad_compose():
    deq = make()
    xs = jnp.stack([X, -X, 2 * X])

    @nnx.jit
    def batched_loss(deq, xs):
        return jnp.sum(nnx.vmap(lambda x: deq(x, Z0), in_axes=0)(xs) ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(batched_loss))(deq, xs)
    per_example = sum(float(jnp.sum(deq(x, Z0) ** 2)) for x in xs)
    np.testing.assert_allclose(value, per_example, rtol=1e-12)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_inside_scan_with_warm_starts():
    # z_t = DEQ(x_t, z_{t-1}): each solve starts from the previous solution.
    deq = make(solver=ij.Picard())
    xs = X[None] + 0.01 * jnp.arange(8.0)[:, None]

    def step(z, x):
        z, sol = deq(x, z, return_solution=True)
        return z, sol.num_steps

    _, steps = jax.jit(lambda xs: jax.lax.scan(step, Z0, xs))(xs)
    cold = jax.vmap(lambda x: deq(x, Z0, return_solution=True)[1].num_steps)(xs)
    assert int(steps[1:].sum()) < int(cold[1:].sum())


def test_bad_input_raises_clear_errors():
    class Widening(Cell):  # the output has one more entry than z
        def __call__(self, z, x):
            return jnp.concatenate([super().__call__(z, x), z[:1]])

    with pytest.raises(ValueError, match="shape"):
        DEQ(Widening(nnx.Rngs(0)))(X, Z0)
    diverging = DEQ(Cell(nnx.Rngs(0), scale=20.0), atol=1e-12, max_steps=5, throw=True)
    with pytest.raises(Exception, match="converge"):
        jax.block_until_ready(diverging(X, Z0))
    with pytest.raises(TypeError, match="callable"):
        DEQ(3)
    with pytest.raises(TypeError, match="nnx.Module"):
        DEQ(lambda z, x: z)  # a plain function has no state to split
