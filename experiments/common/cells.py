"""Recurrent cells shared by the sequence experiments, benchmarks and tests.

Each constructor returns `(f, init, xs)` for `lax.scan(f, init, xs)`: `f(h, x)` returns
`(h_next, y)` with y a readout of the new state.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

from iterjax import sequence as seq
from iterjax.internal import Sweeps, flat_cell, ravel


def tanh_rnn(dim=8, length=256, scale=0.8, input_dim=None, seed=0, dtype=None):
    """h_t = tanh(W h_{t-1} + U x_t + b), W with spectral norm `scale`.

    scale < 1 is a contraction; scale > 1 gives expanding (and, for large scale,
    chaotic) dynamics. `dtype` (default: JAX's default float) of every array.
    """
    input_dim = input_dim or dim
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(seed), 4)
    w = jax.random.normal(k1, (dim, dim))
    w = scale * w / jnp.linalg.norm(w, 2)
    u = jax.random.normal(k2, (dim, input_dim)) / jnp.sqrt(input_dim)
    b = 0.1 * jax.random.normal(k3, (dim,))
    xs = jax.random.normal(k4, (length, input_dim))
    if dtype is not None:
        w, u, b, xs = (a.astype(dtype) for a in (w, u, b, xs))

    def f(h, x):
        h = jnp.tanh(w @ h + u @ x + b)
        return h, jnp.sum(h)

    return f, jnp.zeros(dim, xs.dtype), xs


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


def max_error(a, b):
    """The largest |a - b| over the leaves of two pytrees of the same structure."""
    return max(
        float(jnp.max(jnp.abs(u - v)))
        for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def parallel_depth(method, length):
    """Sequential depth of one sweep of `method` over `length` steps, in cell
    evaluations and associative-combine levels (the unit a GPU pays in latency).

    Jacobi: 1. Gauss-Seidel: the block. Picard/DEER/QuasiDEER: 1 + the 2 log2(W)
    levels of `associative_scan`. ELK / QuasiELK: 1 + two scans (Kalman filter and
    smoother). Sequential: the length.
    """
    w = min(method.window or length, length)
    levels = 2 * math.ceil(math.log2(max(w, 2)))
    if isinstance(method, seq.Sequential):
        return length
    if isinstance(method, seq.GaussSeidel):
        return min(method.block, w)
    if isinstance(method, seq.ELK):  # QuasiELK too: filter and smoother scans
        return 1 + 2 * levels
    if isinstance(method, seq.Jacobi):
        return 1
    return 1 + levels


def sweep_errors(f, init, xs, method, atol, num_sweeps):
    """max |X^k - X*| after each of `num_sweeps` sweeps of `method`, X* from
    `lax.scan`: the error-vs-sweeps curve that `ScanStats.trace` (a residual) only
    bounds. Steps the sweep core one jitted sweep at a time."""
    s0, unravel = ravel(init)
    cell, consts = flat_cell(f, init, s0, unravel, xs)
    ref = jax.vmap(lambda c: ravel(c)[0])(
        jax.lax.scan(lambda c, x: (f(c, x)[0],) * 2, init, xs)[1]
    )
    solver = Sweeps(method, atol, 0.0)
    args = (s0, xs, consts)
    X = jnp.broadcast_to(s0, ref.shape)
    state = solver.init(cell, X, args)
    step = jax.jit(lambda X, s: solver.step(cell, X, args, s))
    errors = []
    for _ in range(num_sweeps):
        X, state = step(X, state)
        errors.append(float(jnp.max(jnp.abs(X - ref))))
        if int(state.accepted) == ref.shape[0]:  # converged: X stops changing
            break
    return np.asarray(errors)
