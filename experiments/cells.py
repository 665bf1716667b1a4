"""Recurrent cells shared by the sequence experiments, benchmarks and tests.

Each constructor returns `(f, init, xs)` for `lax.scan(f, init, xs)`: `f(h, x)` returns
`(h_next, y)` with y a readout of the new state.
"""

import jax
import jax.numpy as jnp


def tanh_rnn(dim=8, length=256, scale=0.8, input_dim=None, seed=0):
    """h_t = tanh(W h_{t-1} + U x_t + b), W with spectral norm `scale`.

    scale < 1 is a contraction; scale > 1 gives expanding (and, for large scale,
    chaotic) dynamics.
    """
    input_dim = input_dim or dim
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    w = jax.random.normal(k1, (dim, dim))
    w = scale * w / jnp.linalg.norm(w, 2)
    u = jax.random.normal(k2, (dim, input_dim)) / jnp.sqrt(input_dim)
    b = 0.1 * jax.random.normal(k3, (dim,))
    xs = jax.random.normal(k4, (length, input_dim))

    def f(h, x):
        h = jnp.tanh(w @ h + u @ x + b)
        return h, jnp.sum(h)

    return f, jnp.zeros(dim), xs


def gru_params(key, dim, input_dim, scale=1.0):
    """GRU weights with Glorot-like scaling (`scale` multiplies the recurrent ones)."""
    ks = jax.random.split(key, 6)
    rec = lambda k: scale * jax.random.normal(k, (3, dim, dim)) / jnp.sqrt(dim)
    inp = lambda k: jax.random.normal(k, (3, dim, input_dim)) / jnp.sqrt(input_dim)
    return {"w": rec(ks[0]), "u": inp(ks[1]), "b": jnp.zeros((3, dim))}


def gru_cell(params, h, x):
    """One GRU step (Cho et al. 2014): gates z, r and candidate n."""
    w, u, b = params["w"], params["u"], params["b"]
    z = jax.nn.sigmoid(w[0] @ h + u[0] @ x + b[0])
    r = jax.nn.sigmoid(w[1] @ h + u[1] @ x + b[1])
    n = jnp.tanh(r * (w[2] @ h) + u[2] @ x + b[2])
    return (1 - z) * n + z * h


def gru(dim=16, length=256, input_dim=4, scale=1.0, seed=0):
    """A random GRU over a random input sequence."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    params = gru_params(k1, dim, input_dim, scale)
    xs = jax.random.normal(k2, (length, input_dim))

    def f(h, x):
        h = gru_cell(params, h, x)
        return h, h[0]

    return f, jnp.zeros(dim), xs


CELLS = {"tanh_rnn": tanh_rnn, "gru": gru}
