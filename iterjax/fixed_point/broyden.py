"""Limited-memory Broyden's method."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._checks import check_int
from .._iterate import AbstractFixedPointSolver
from .._types import Array, Float, Int, Y
from ._flat import push, ravel, safe_div, tiny


class BroydenState(NamedTuple):
    residual: Y  # g(y) = fn(y, args) - y
    g: Float[Array, " n"]  # the residual, flattened
    us: Float[Array, "m n"]  # rank-one factors u_i
    vs: Float[Array, "m n"]  # rank-one factors v_i
    pushed: Int[Array, ""]


class Broyden(AbstractFixedPointSolver):
    """Broyden's "good" method on g(y) = f(y) - y with a limited-memory inverse.

    The inverse Jacobian of g is approximated by H = -I + Σ_i u_i v_iᵀ (at most m
    rank-one updates, then a restart from H0 = -I; a step from H0 is a Picard
    step). Each step:

        s = -H g(y),   y <- y + s,   Δg = g(y_new) - g(y)
        H <- H + (s - H Δg) (sᴴ H) / (sᴴ H Δg)      (Sherman-Morrison)

    When sᴴ H Δg vanishes the update is skipped. One function evaluation per step;
    superlinear convergence near a solution (Bai et al. 2019 use it for DEQs).

    Attributes:
      history: m >= 1, the number of rank-one updates before a restart.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> f = lambda z, a: jnp.cos(a * z)  # z* = cos(z*)
      >>> sol = iterjax.fixed_point(f, jnp.zeros(2), 1.0, solver=iterjax.Broyden())
      >>> bool(sol.converged), [round(float(v), 4) for v in sol.value]
      (True, [0.7391, 0.7391])
    """

    history: int = struct.field(pytree_node=False, default=16)

    def __post_init__(self):
        check_int("Broyden", "history", self.history, 1)

    def init(self, fn, y0, args):
        residual = jax.tree_util.tree_map(lambda a, b: a - b, fn(y0, args), y0)
        g, _ = ravel(residual)
        zeros = jnp.zeros((self.history, g.shape[0]), g.dtype)
        return BroydenState(residual, g, zeros, zeros, jnp.int32(0))

    def step(self, fn, y, args, state):
        y_flat, unravel = ravel(y)
        g, us, vs = state.g, state.us, state.vs
        # Full memory: restart from H0 = -I. Overwriting the oldest pair instead
        # (as torchdeq does) breaks the chain of Sherman-Morrison updates and can
        # diverge on indefinite Jacobians.
        full = (state.pushed > 0) & (state.pushed % self.history == 0)
        us, vs = jnp.where(full, 0.0, us), jnp.where(full, 0.0, vs)

        def hmv(x):  # H x
            return -x + (vs @ x) @ us

        s = -hmv(g)
        y_new = (y_flat + s).astype(y_flat.dtype)
        y_tree = unravel(y_new)
        residual = jax.tree_util.tree_map(lambda a, b: a - b, fn(y_tree, args), y_tree)
        g_new, _ = ravel(residual)

        dg = g_new - g
        v = -jnp.conj(s) + (us @ jnp.conj(s)) @ vs  # sᴴ H
        u = safe_div(s - hmv(dg), v @ dg, tiny(g.dtype))
        us, vs = push(us, state.pushed, u), push(vs, state.pushed, v)
        return y_tree, BroydenState(residual, g_new, us, vs, state.pushed + 1)
