"""Matrix-free Newton's method."""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from .. import _tree as tu
from .._iterate import AbstractFixedPointSolver
from ..linear import GMRES, AbstractLinearSolver


class NewtonState(NamedTuple):
    residual: object  # like y: g(y) = fn(y, args) - y
    matvecs: jax.Array  # int32: Jacobian-vector products so far (-1: not counted)


class Newton(AbstractFixedPointSolver):
    """Newton's method on g(y) = f(y) - y (for `root(F)`, g = -F).

        solve  -g'(y_k) s = g(y_k),   y_{k+1} = y_k + s

    The Jacobian is never formed: `jax.linearize` gives g'(y_k) as a function and
    the linear solver (GMRES by default) only calls Jacobian-vector products.
    Quadratic convergence near a solution with a nonsingular Jacobian. Each step
    costs one linearisation, one function evaluation and the solver's JVPs
    (counted in `Solution.stats["jvps"]` where the solver counts them). The system
    is written with -g' so that for `root(∇L)` and `argmin` it is the Hessian
    system H s = -∇L, symmetric positive definite at a strict minimum: `CG()`
    applies.

    Attributes:
      linear_solver: matrix-free solver for the Newton system.
    """

    linear_solver: AbstractLinearSolver = struct.field(
        pytree_node=False, default=GMRES(rtol=1e-10)
    )

    def init(self, fn, y0, args):
        return NewtonState(tu.tree_sub(fn(y0, args), y0), jnp.int32(0))

    def step(self, fn, y, args, state):
        g = lambda z: tu.tree_sub(fn(z, args), z)
        _, jvp = jax.linearize(g, y)
        minus_jvp = lambda v: tu.tree_scale(-1.0, jvp(v))
        s, stats = self.linear_solver.solve_with_stats(minus_jvp, state.residual)
        y = tu.tree_add(y, s)
        counted = (state.matvecs >= 0) & (stats.num_matvecs >= 0)
        matvecs = jnp.where(counted, state.matvecs + stats.num_matvecs, -1)
        return y, NewtonState(g(y), matvecs)

    def summary(self, state) -> dict:
        return {"jvps": state.matvecs}
