"""Problems with reference solutions, and the solver lists every test runs over."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import scipy.optimize

import iterjax as ij
from iterjax.experiments.common import problems

# Solvers that reach 1e-10 on contractions, every wrapper among them; the
# textbook Halpern (O(1/k), no restarts) is tested separately.
SOLVERS = {
    "picard": ij.Picard(),
    "picard-damped": ij.Picard(damping=0.7),
    "anderson": ij.Anderson(),
    "anderson-m2": ij.Anderson(history=2, mixing=0.8),
    "broyden": ij.Broyden(),
    "newton": ij.Newton(),
    "lazy-newton": ij.LazyNewton(2),
    "halpern": ij.Halpern(),
    "momentum": ij.Momentum(),
}
WRAPPERS = {
    "relaxed": lambda s: ij.Relaxed(s, 0.8),
    "restarted": ij.Restarted,
    "safeguarded": ij.Safeguarded,
    "switched": lambda s: ij.Switched(ij.Picard(), s, after=6),
    "backtracking": ij.Backtracking,
}
ALL_SOLVERS = [
    *SOLVERS.values(),
    ij.Relaxed(ij.Anderson(), 0.8),
    ij.Restarted(ij.Anderson(3)),
    ij.Safeguarded(ij.Broyden()),
]
IDS = [
    *SOLVERS,
    "relaxed-anderson",
    "restarted-anderson",
    "safeguarded-broyden",
]


def tanh_cell(n=12, radius=0.8, seed=0):
    return problems.tanh_deq(n, radius, seed)


def slow_system(n=12, radius=0.97, seed=1):
    return problems.slow_system(n, radius, seed)


def pytree_problem(seed=2):
    return problems.pytree_problem(4, seed)


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
    new = [
        jax.random.normal(k, jnp.shape(x), jnp.result_type(x))
        for k, x in zip(keys, leaves)
    ]
    return jax.tree_util.tree_unflatten(treedef, new)


def tree_dot(a, b):
    return sum(
        jnp.vdot(x, y)
        for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b))
    )


def run_on_host_devices(script: str, devices: int = 8) -> str:
    """Run `script` in a fresh interpreter seeing `devices` CPU devices (XLA fixes
    the count when JAX starts); return its stdout, failing with its stderr."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(
        os.environ,
        XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
        f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=root,
        JAX_PLATFORMS="cpu",
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout
