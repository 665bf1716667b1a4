"""Pytree arithmetic used by every solver.

All helpers are leaf-wise and preserve dtypes; reductions (`tree_vdot`, `max_abs`)
return 0-d arrays. Inner products conjugate their first argument, so complex
pytrees work wherever the mathematics does.
"""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

tree_map = jtu.tree_map


def tree_add(x, y):
    return tree_map(lambda a, b: a + b, x, y)


def tree_sub(x, y):
    return tree_map(lambda a, b: a - b, x, y)


def _like(alpha, a):
    """A scalar coefficient in the dtype of leaf `a` (no implicit promotion)."""
    if isinstance(alpha, (int, float, complex)):
        return alpha
    return jnp.asarray(alpha).astype(a.dtype)


def tree_scale(alpha, x):
    return tree_map(lambda a: _like(alpha, a) * a, x)


def tree_axpy(alpha, x, y):
    """alpha * x + y."""
    return tree_map(lambda a, b: _like(alpha, b) * a + b, x, y)


def tree_lerp(beta, x, y):
    """(1 - beta) * x + beta * y, the damped (Krasnosel'skii-Mann) update."""
    return tree_map(lambda a, b: a + _like(beta, a) * (b - a), x, y)


def tree_vdot(x, y):
    """sum_i conj(x_i) * y_i over all leaves."""
    leaves = [jnp.vdot(a, b) for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))]
    return sum(leaves[1:], leaves[0]) if leaves else jnp.array(0.0)


def max_abs(x):
    """The infinity norm of a pytree: the largest |x_i| over all leaves."""
    leaves = [jnp.max(jnp.abs(a), initial=0.0) for a in jtu.tree_leaves(x)]
    return jnp.max(jnp.stack(leaves)) if leaves else jnp.array(0.0)


def tree_where(pred, x, y):
    """Leaf-wise `jnp.where(pred, x, y)` with a scalar predicate."""
    return tree_map(lambda a, b: jnp.where(pred, a, b), x, y)


def tree_all_close(r, y, atol, rtol):
    """True when |r_i| <= atol + rtol * |y_i| for every element of every leaf."""
    oks = [
        jnp.all(jnp.abs(a) <= atol + rtol * jnp.abs(b))
        for a, b in zip(jtu.tree_leaves(r), jtu.tree_leaves(y))
    ]
    return jnp.all(jnp.stack(oks)) if oks else jnp.array(True)


def tree_isfinite(x):
    oks = [jnp.all(jnp.isfinite(a)) for a in jtu.tree_leaves(x)]
    return jnp.all(jnp.stack(oks)) if oks else jnp.array(True)


def tree_zeros_like(x):
    return tree_map(jnp.zeros_like, x)


def tree_structs(x):
    """The `jax.ShapeDtypeStruct` of every leaf."""
    return tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)
