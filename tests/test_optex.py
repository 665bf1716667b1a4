"""OptEx (iterjax.tuning.OptEx): N = 1 is its optimiser, the kernel model
interpolates its history, N > 1 saves rounds; jit, vmap, grad; bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import iterjax as ij
from iterjax.internal import optax_init, optax_step

SCALES = jnp.geomspace(1.0, 10.0, 6)


def loss(w):
    return 0.5 * jnp.sum(SCALES * w["a"] ** 2) + jnp.sum(jnp.cosh(w["b"]))


W0 = {"a": jnp.ones(6), "b": jnp.array([0.5, -1.0])}


def rounds(optex, w0, count):
    def body(carry, _):
        w, state = carry
        w, state, info = optex.step(jax.grad(loss), w, state)
        return (w, state), (loss(w), info["proxy_error"])

    (w, _), trace = jax.lax.scan(body, (w0, optex.init(w0)), None, length=count)
    return w, trace


@pytest.mark.parametrize("optimizer", [optax.sgd(0.1), optax.adam(0.05)])
def test_parallelism_one_is_the_optimiser(optimizer):
    w, (losses, errors) = jax.jit(
        lambda w0: rounds(ij.tuning.OptEx(optimizer, 1), w0, 20)
    )(W0)
    want, state = W0, optax_init(optimizer, W0)
    for _ in range(20):
        want, state = optax_step(optimizer, jax.grad(loss)(want), state, want)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-13), w, want)
    assert bool(jnp.all(errors == 0))


def test_the_kernel_model_interpolates_its_history():
    optex = ij.tuning.OptEx(optax.sgd(0.1), 4, history=8, lengthscale=2.0, noise=1e-10)
    state = optex.init(W0)
    np.testing.assert_array_equal(
        jax.flatten_util.ravel_pytree(optex.predict(W0, state))[0], 0.0
    )
    w = W0
    for _ in range(2):
        w, state, _ = optex.step(jax.grad(loss), w, state)
    assert int(jnp.sum(state.filled)) == 8 and int(state.head) == 0  # the ring is full
    for point, grad in zip(state.points, state.grads):
        _, unravel = jax.flatten_util.ravel_pytree(W0)
        got = jax.flatten_util.ravel_pytree(optex.predict(unravel(point), state))[0]
        np.testing.assert_allclose(got, grad, rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(
            grad,
            jax.flatten_util.ravel_pytree(jax.grad(loss)(unravel(point)))[0],
            rtol=1e-12,
        )


def test_parallel_rounds_save_sequential_steps_under_jit_and_vmap():
    target = 1e-8 * float(loss(W0) - 2.0)  # min loss = 2 (cosh(0) twice)

    def rounds_to_target(parallelism, lengthscale):
        optex = ij.tuning.OptEx(optax.sgd(0.1), parallelism, lengthscale=lengthscale)
        _, (losses, _) = rounds(optex, W0, 80)
        hit = losses - 2.0 <= target
        return jnp.where(jnp.any(hit), jnp.argmax(hit) + 1, 10**6)

    ls = jnp.array([1.0, 3.0])  # the lengthscale is a leaf: a grid is one vmap
    one = jax.jit(jax.vmap(lambda s: rounds_to_target(1, s)))(ls)
    four = jax.jit(jax.vmap(lambda s: rounds_to_target(4, s)))(ls)
    assert bool(jnp.all(one == one[0])) and int(one[0]) < 10**6  # plain SGD
    assert bool(jnp.all(4 * four <= 2 * one)), (one, four)  # >= 2x fewer rounds


def test_gradient_through_rounds_is_finite_differences():
    optex = ij.tuning.OptEx(optax.sgd(0.1), 3, lengthscale=2.0)
    f = jax.jit(lambda a: loss(rounds(optex, {"a": a, "b": W0["b"]}, 4)[0]))
    a = W0["a"]
    g = jax.grad(f)(a)
    v = jax.random.normal(jax.random.key(0), a.shape)
    eps = 1e-6
    fd = (f(a + eps * v) - f(a - eps * v)) / (2 * eps)
    np.testing.assert_allclose(g @ v, fd, rtol=1e-6)


def test_nan_gradients_give_nan_parameters():
    optex = ij.tuning.OptEx(optax.sgd(0.1), 3)
    w, state = W0, optex.init(W0)
    w, state, _ = optex.step(lambda w: jax.tree.map(lambda x: x * jnp.nan, w), w, state)
    assert bool(jnp.all(jnp.isnan(w["a"])))


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(parallelism=0), "parallelism"),
        (dict(parallelism=4, history=3), "history"),
        (dict(lengthscale=0.0), "lengthscale"),
        (dict(noise=-1.0), "noise"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ij.tuning.OptEx(optax.sgd(0.1), **kwargs)
    with pytest.raises(TypeError, match="optimizer"):
        ij.tuning.OptEx(lambda g: g)
