"""Validation shared by every public entry point: clear errors at trace time."""

import contextlib

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


def describe(tree):
    """The shapes and dtypes of a pytree's leaves, compactly: `{'a': f64[3]}`."""
    short = lambda a: f"{jnp.result_type(a).name}{list(jnp.shape(a))}"
    return str(jtu.tree_map(short, tree)).replace("'", "")


@contextlib.contextmanager
def user_call(owner, call, arguments, errors=()):
    """Run a user's function: a TypeError or ValueError it raises (a shape mismatch
    deep in `dot_general`, say), or one of `errors`, is raised again naming
    `owner`, the `call` and the shapes of the `arguments` (a dict name -> pytree)."""
    try:
        yield
    except (TypeError, ValueError, *errors) as e:
        shapes = ", ".join(f"{n} {describe(a)}" for n, a in arguments.items())
        kind = TypeError if isinstance(e, TypeError) else ValueError
        raise kind(
            f"{owner}: calling {call} failed with {shapes}; check that they have "
            f"the shapes it expects. {type(e).__name__}: {e}"
        ) from e


def eval_shape(owner, call, fn, *args, names=(), errors=()):
    """`jax.eval_shape(fn, *args)` of a user's function, under `user_call`."""
    with user_call(owner, call, dict(zip(names, args)), errors):
        return jax.eval_shape(fn, *args)


def check_scalar_loss(owner, name, loss, w, theta):
    """`loss(w, theta)` must return a real scalar; raise naming `name` otherwise."""
    if not callable(loss):
        raise TypeError(f"{owner}: `{name}` must be callable, got {type(loss)}")
    out = eval_shape(owner, f"{name}(w, theta)", loss, w, theta, names=("w", "theta"))
    leaves = jtu.tree_leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        shapes = [x.shape for x in leaves]
        raise ValueError(
            f"{owner}: `{name}` must return a scalar, got shapes {shapes} (sum or "
            "average the per-example losses)"
        )
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise TypeError(
            f"{owner}: `{name}` must return a real float, got {leaves[0].dtype}"
        )


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
    """Every leaf of `tree` is a float or complex array (TypeError naming it)."""
    _check_dtypes(owner, name, tree, jnp.inexact, "a float or complex array")


def check_floating(owner, name, tree, hint=""):
    """Every leaf of `tree` is a real float array (TypeError naming it, + hint)."""
    _check_dtypes(owner, name, tree, jnp.floating, "a float array", hint)


def _check_dtypes(owner, name, tree, kind, what, hint=""):
    leaves = jtu.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(f"{owner}: `{name}` has no array leaves")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, kind):
            raise TypeError(
                f"{owner}: every leaf of `{name}` must be {what}; leaf "
                f"{name}{jtu.keystr(path)} has dtype {dtype}{hint}"
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
        where = f" at leaf {jtu.keystr(path)}" if path else ""
        sa, sb = jnp.shape(a), jnp.shape(b)
        da, db = jnp.result_type(a), jnp.result_type(b)
        if sa != sb:
            raise ValueError(
                f"{owner}: {what} returned shape {sa}{where} "
                f"but `{expected_name}` has shape {sb} there"
            )
        if da != db:
            raise ValueError(
                f"{owner}: {what} returned dtype {da}{where} "
                f"but `{expected_name}` has dtype {db} there; cast inside fn or "
                f"change `{expected_name}`"
            )
