"""Pytree arithmetic used by every solver.

All helpers are leaf-wise and preserve dtypes; reductions (`tree_vdot`, `max_abs`)
return 0-d arrays. Inner products conjugate their first argument, so complex
pytrees work wherever the mathematics does.
"""

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

tree_map = jtu.tree_map


def tree_add(x, y):
    return tree_map(lambda a, b: a + b, x, y)


def tree_sub(x, y):
    return tree_map(lambda a, b: a - b, x, y)


def like(alpha, a):
    """A scalar coefficient in the dtype of leaf `a` (no implicit promotion)."""
    if isinstance(alpha, (int, float, complex)):
        return alpha
    return jnp.asarray(alpha).astype(a.dtype)


def tree_scale(alpha, x):
    return tree_map(lambda a: like(alpha, a) * a, x)


def tree_axpy(alpha, x, y):
    """alpha * x + y."""
    return tree_map(lambda a, b: like(alpha, b) * a + b, x, y)


def tree_lerp(beta, x, y):
    """(1 - beta) * x + beta * y, the damped (Krasnosel'skii-Mann) update."""
    return tree_map(lambda a, b: a + like(beta, a) * (b - a), x, y)


def tree_vdot(x, y):
    """sum_i conj(x_i) * y_i over all leaves."""
    leaves = [jnp.vdot(a, b) for a, b in zip(jtu.tree_leaves(x), jtu.tree_leaves(y))]
    return sum(leaves[1:], leaves[0]) if leaves else jnp.array(0.0)


def nan_safe_max(a, **kwargs):
    """`jnp.max` in which a NaN is never lost: XLA's CPU reduction of 4096 or
    more elements skips NaNs (max of [1, NaN, ...] is 1; of all NaN, -inf), so a
    NaN counts as +inf here. A stopping test built on it cannot pass a NaN."""
    return jnp.max(jnp.where(jnp.isnan(a), jnp.inf, a), **kwargs)


def max_abs(x):
    """The infinity norm of a pytree: the largest |x_i| over all leaves (inf
    where a leaf holds a NaN).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> x = {"a": jnp.array([3.0, -4.0]), "b": jnp.array(1.0)}
      >>> float(iterjax.max_norm(x)), float(iterjax.max_norm(jnp.array([1.0, jnp.nan])))
      (4.0, inf)"""
    leaves = [nan_safe_max(jnp.abs(a), initial=0.0) for a in jtu.tree_leaves(x)]
    return _reduce(nan_safe_max, leaves)


max_norm = max_abs


def two_norm(x):
    """The Euclidean norm of a pytree (all leaves flattened together).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> float(iterjax.two_norm({"a": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}))
      5.0"""
    leaves = [jnp.sum(jnp.abs(a) ** 2) for a in jtu.tree_leaves(x)]
    return jnp.sqrt(_reduce(jnp.sum, leaves))


def rms_norm(x):
    """two_norm(x) / sqrt(number of elements).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> float(iterjax.rms_norm({"a": jnp.array([3.0, 0.0]), "b": jnp.array(4.0)}))
      2.886751..."""
    size = sum(jnp.size(a) for a in jtu.tree_leaves(x))
    return two_norm(x) / max(size, 1) ** 0.5


def _reduce(op, leaves):
    if not leaves:
        return jnp.array(0.0)
    dtype = functools.reduce(jnp.promote_types, [a.dtype for a in leaves])
    return op(jnp.stack([a.astype(dtype) for a in leaves]))


def tree_where(pred, x, y):
    """Leaf-wise `jnp.where(pred, x, y)` with a scalar predicate."""
    return tree_map(lambda a, b: jnp.where(pred, a, b), x, y)


def tree_scaled(r, y, atol, rtol):
    """r_i / (atol + rtol |y_i|), the argument of a mixed absolute/relative test."""
    return tree_map(lambda a, b: a / (atol + rtol * jnp.abs(b)).astype(a.dtype), r, y)


def all_finite(x):
    """Whether every element of every leaf is finite (a 0-d bool)."""
    leaves = [jnp.all(jnp.isfinite(a)) for a in jtu.tree_leaves(x)]
    return functools.reduce(jnp.logical_and, leaves, jnp.bool_(True))


def tree_zeros_like(x):
    return tree_map(jnp.zeros_like, x)


def tree_structs(x):
    """The `jax.ShapeDtypeStruct` of every leaf."""
    return tree_map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)), x)


def ravel(tree):
    """Flatten a pytree to one 1-d array of the leaves' promoted dtype.

    Returns `(flat, unravel)`; `unravel` restores every leaf's shape and dtype. Unlike
    `jax.flatten_util.ravel_pytree` it promotes explicitly, so mixed float32/float64
    pytrees work under `jax_numpy_dtype_promotion="strict"`.
    """
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    dtypes = [jnp.result_type(leaf) for leaf in leaves]
    with jax.numpy_dtype_promotion("standard"):
        dtype = jnp.result_type(*dtypes)
    shapes = [jnp.shape(leaf) for leaf in leaves]
    sizes = [math.prod(s) for s in shapes]
    flat = jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])

    def unravel(vec):
        parts = jnp.split(vec, list(itertools.accumulate(sizes))[:-1])
        out = [p.reshape(s).astype(d) for p, s, d in zip(parts, shapes, dtypes)]
        return jax.tree_util.tree_unflatten(treedef, out)

    return flat, unravel
