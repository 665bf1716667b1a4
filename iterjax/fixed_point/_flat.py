"""Flat-vector helpers for the solvers that keep a history (Anderson, Broyden)."""

import jax
import jax.numpy as jnp

from .._tree import ravel as ravel  # noqa: F401


def safe_div(num, den, tiny):
    """num / den where |den| > tiny, else 0; NaN-free in value and gradient."""
    ok = jnp.abs(den) > tiny
    return jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


def tiny(dtype):
    return jnp.finfo(jnp.real(jnp.zeros((), dtype)).dtype).tiny ** 0.5


def push(buffer, index, row):
    """Write `row` into a circular buffer of shape [m, n] at `index % m`."""
    return jax.lax.dynamic_update_index_in_dim(buffer, row, index % buffer.shape[0], 0)
