"""Validation shared by every public entry point: clear errors at trace time."""

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np


def concrete_number(value):
    """`float(value)` when `value` is known at trace time, else `None`."""
    if isinstance(value, (bool, int, float, np.number)):
        return float(value)
    if isinstance(value, np.ndarray) and value.size == 1:
        return float(value)
    if (
        isinstance(value, jax.Array)
        and not isinstance(value, jax.core.Tracer)
        and value.size == 1
    ):
        return float(value)
    return None


def check_range(owner, name, value, lo=None, hi=None, lo_open=False, hi_open=False):
    """Raise ValueError naming `owner.name` when a concrete `value` is out of range."""
    x = concrete_number(value)
    if x is None:
        return
    bad = (
        np.isnan(x)
        or (lo is not None and (x <= lo if lo_open else x < lo))
        or (hi is not None and (x >= hi if hi_open else x > hi))
    )
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        lo_s = "-inf" if lo is None else lo
        hi_s = "inf" if hi is None else hi
        raise ValueError(
            f"{owner}: `{name}` must lie in {left}{lo_s}, {hi_s}{right}, got {value!r}"
        )


def check_int(owner, name, value, minimum):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{owner}: `{name}` must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{owner}: `{name}` must be >= {minimum}, got {value!r}")


def check_inexact(owner, name, tree):
    leaves = jtu.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(f"{owner}: `{name}` has no array leaves")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(
                f"{owner}: every leaf of `{name}` must be a float or complex array; "
                f"leaf {name}{jtu.keystr(path)} has dtype {dtype}"
            )


def check_same_structure(owner, what, out, expected, expected_name="y0"):
    """`out` must match `expected` in pytree structure, shapes and dtypes."""
    out_def, exp_def = jtu.tree_structure(out), jtu.tree_structure(expected)
    if out_def != exp_def:
        raise ValueError(
            f"{owner}: {what} must return a pytree with the structure of "
            f"`{expected_name}`; got {out_def}, expected {exp_def}"
        )
    for (path, a), b in zip(jtu.tree_leaves_with_path(out), jtu.tree_leaves(expected)):
        sa, sb = jnp.shape(a), jnp.shape(b)
        da, db = jnp.result_type(a), jnp.result_type(b)
        if sa != sb:
            raise ValueError(
                f"{owner}: {what} returned shape {sa} at leaf {jtu.keystr(path)!s} "
                f"but `{expected_name}` has shape {sb} there"
            )
        if da != db:
            raise ValueError(
                f"{owner}: {what} returned dtype {da} at leaf {jtu.keystr(path)!s} "
                f"but `{expected_name}` has dtype {db} there; cast inside fn or "
                f"change `{expected_name}`"
            )
