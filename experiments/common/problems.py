"""Fixed-point problems shared by experiments, benchmarks and tests.

Each constructor returns `(fn, args, y0)` with `fn(y, args)` a contraction.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp


def _orthogonal(key, n):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    return q


def tanh_deq(dim=64, radius=0.9, seed=0):
    """A DEQ cell y = tanh(W y + x) with singular values of W in [radius/4, radius]."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    s = jnp.linspace(radius, radius / 4, dim)
    w = _orthogonal(k1, dim) @ jnp.diag(s) @ _orthogonal(k2, dim).T
    x = jax.random.normal(k3, (dim,))
    return _tanh_cell, (w, x), jnp.zeros(dim)


def _tanh_cell(y, args):
    w, x = args
    return jnp.tanh(w @ y + x)


def slow_system(dim=64, radius=0.98, seed=1):
    """y = A tanh(y) + b, A symmetric with eigenvalues in [-radius, radius].

    The Jacobian at the (small) solution has spectral radius close to `radius`, so
    Picard iteration contracts by about `radius` per step: slow.
    """
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    q = _orthogonal(k1, dim)
    a = q @ jnp.diag(jnp.linspace(-radius, radius, dim)) @ q.T
    b = 0.1 * jax.random.normal(k2, (dim,))
    return _slow_map, (a, b), jnp.zeros(dim)


def _slow_map(y, args):
    a, b = args
    return a @ jnp.tanh(y) + b


def pytree_problem(dim=4, seed=2):
    """A coupled contraction on {'a': vector[3], 'b': (matrix[2, dim // 2],)}."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    m1 = 0.15 * jax.random.normal(k1, (3, dim))
    m2 = 0.15 * jax.random.normal(k2, (dim, 3))
    c = jax.random.normal(k3, (3,))
    y0 = {"a": jnp.zeros(3), "b": (jnp.zeros((2, dim // 2)),)}
    return _pytree_map, (m1, m2, c), y0


def _pytree_map(y, args):
    m1, m2, c = args
    a = jnp.cos(m1 @ y["b"][0].reshape(-1)) + c
    b = jnp.tanh(m2 @ a).reshape(y["b"][0].shape)
    return {"a": a, "b": (b,)}


def logistic(dim=64, seed=3, mu=1e-3, start=5.0):
    """Gradient descent's map y - ∇L(y) / ℓ of an L2-regularised logistic loss,
    L(y) = mean log(1 + exp(-t_i x_iᵀ y)) + μ/2 |y|², with ℓ an upper bound on
    ∇L's Lipschitz constant: a contraction by 1 - μ/ℓ (slow for small μ).

    The data are 4 dim points whose labels follow a random teacher, with 10% of
    them flipped. The start y0 = `start` · (1, ..., 1) saturates the sigmoids: the
    Hessian is tiny there and full Newton steps overshoot.
    """
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    n = 4 * dim
    x = jax.random.normal(k1, (n, dim)) / jnp.sqrt(dim)
    teacher = jax.random.normal(k2, (dim,))
    flip = jax.random.bernoulli(k3, 0.1, (n,))
    t = jnp.where(flip, -1.0, 1.0) * jnp.sign(x @ teacher)
    lipschitz = jnp.linalg.norm(x, 2) ** 2 / (4 * n) + mu
    return _logistic_map, (x, t, mu, lipschitz), jnp.full(dim, start)


def _logistic_map(y, args):
    x, t, mu, lipschitz = args
    margin = t * (x @ y)
    grad = -(x.T @ (t * jax.nn.sigmoid(-margin))) / x.shape[0] + mu * y
    return y - grad / lipschitz


PROBLEMS: dict[str, Callable[..., tuple]] = {
    "tanh_deq": tanh_deq,
    "slow_system": slow_system,
    "pytree": pytree_problem,
    "logistic": logistic,
}
