"""Halpern (anchored) iteration."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _tree as tu
from .._iterate import AbstractFixedPointSolver


class HalpernState(NamedTuple):
    residual: object  # like y: fn(y, args) - y
    anchor: object  # like y: y0
    count: jax.Array  # shape=(), int32


class Halpern(AbstractFixedPointSolver):
    """Halpern iteration anchored at the initial guess.

        y_{k+1} = β_k y_0 + (1 - β_k) f(y_k),   β_k = 1 / (k + 2)

    For a nonexpansive f it converges to the fixed point nearest y_0 with the
    optimal last-iterate rate |y_k - f(y_k)| = O(1/k) (Lieder 2021), where plain
    Picard iteration may cycle. On contractions it is slower than Picard.
    """

    def init(self, fn, y0, args):
        return HalpernState(tu.tree_sub(fn(y0, args), y0), y0, jnp.int32(0))

    def step(self, fn, y, args, state):
        real = jnp.real(jax.tree_util.tree_leaves(y)[0]).dtype
        beta = 1.0 / (state.count + 2).astype(real)
        fy = tu.tree_add(y, state.residual)
        y = tu.tree_lerp(beta, fy, state.anchor)
        return y, HalpernState(
            tu.tree_sub(fn(y, args), y), state.anchor, state.count + 1
        )
