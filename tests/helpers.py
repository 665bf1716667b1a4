"""Problems with reference solutions, and the solver lists every test runs over."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import iterjax as ij

# Solvers that reach 1e-10 on contractions. Halpern (O(1/k)) is tested separately.
ALL_SOLVERS = [
    ij.Picard(),
    ij.Picard(damping=0.7),
    ij.Anderson(),
    ij.Anderson(history=2, mixing=0.8),
    ij.Broyden(),
    ij.Newton(),
]
IDS = [
    "picard",
    "picard-damped",
    "anderson",
    "anderson-m2",
    "broyden",
    "newton",
]


def _orthogonal(key, n):
    q, _ = jnp.linalg.qr(jax.random.normal(key, (n, n)))
    return q


def tanh_cell(n=12, radius=0.8, seed=0):
    """A small DEQ cell y = tanh(W y + x) with |W|_2 = radius."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    s = jnp.linspace(radius, radius / 4, n)
    w = _orthogonal(k1, n) @ jnp.diag(s) @ _orthogonal(k2, n).T
    x = jax.random.normal(k3, (n,))
    return (lambda y, a: jnp.tanh(a[0] @ y + a[1])), (w, x), jnp.zeros(n)


def slow_system(n=12, radius=0.97, seed=1):
    """y = A tanh(y) + b with symmetric A of spectral radius `radius`: Picard is slow."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    q = _orthogonal(k1, n)
    a = q @ jnp.diag(jnp.linspace(-radius, radius, n)) @ q.T
    b = 0.1 * jax.random.normal(k2, (n,))
    return (lambda y, p: p[0] @ jnp.tanh(y) + p[1]), (a, b), jnp.zeros(n)


def pytree_problem(seed=2):
    """A coupled contraction over a dict holding a vector and a tuple of matrices."""
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
    m1 = 0.3 * jax.random.normal(k1, (3, 4)) / 2
    m2 = 0.3 * jax.random.normal(k2, (4, 3)) / 2
    c = jax.random.normal(k3, (3,))

    def fn(y, p):
        m1, m2, c = p
        a = jnp.cos(m1 @ y["b"][0].reshape(-1)) + c
        b = jnp.tanh(m2 @ a).reshape(2, 2)
        return {"a": a, "b": (b,)}

    y0 = {"a": jnp.zeros(3), "b": (jnp.zeros((2, 2)),)}
    return fn, (m1, m2, c), y0


PROBLEMS = {"tanh": tanh_cell, "slow": slow_system, "pytree": pytree_problem}


def reference(fn, y0, args):
    """The fixed point by scipy.optimize.root (hybr) to 1e-13."""
    flat0, unravel = jax.flatten_util.ravel_pytree(y0)

    def g(v):
        y = unravel(jnp.asarray(v))
        return np.asarray(jax.flatten_util.ravel_pytree(fn(y, args))[0]) - v

    out = scipy.optimize.root(g, np.asarray(flat0), tol=1e-13)
    assert out.success, out.message
    return unravel(jnp.asarray(out.x))


def fd_directional(f, x, v, eps=1e-6):
    """Central finite difference of scalar f along v."""
    plus = jax.tree_util.tree_map(lambda a, b: a + eps * b, x, v)
    minus = jax.tree_util.tree_map(lambda a, b: a - eps * b, x, v)
    return (f(plus) - f(minus)) / (2 * eps)


def random_like(key, tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    keys = jax.random.split(key, len(leaves))
    new = [jax.random.normal(k, jnp.shape(x), jnp.result_type(x)) for k, x in zip(keys, leaves)]
    return jax.tree_util.tree_unflatten(treedef, new)


def tree_dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))
