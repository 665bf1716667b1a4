"""Matrix-free Newton's method."""

from typing import NamedTuple

import jax
from flax import struct

from .. import _tree as tu
from .._iterate import AbstractFixedPointSolver
from ..linear import GMRES, AbstractLinearSolver


class NewtonState(NamedTuple):
    residual: object  # like y: g(y) = fn(y, args) - y


class Newton(AbstractFixedPointSolver):
    """Newton's method on g(y) = f(y) - y (for `root(F)`, g = -F).

        solve  g'(y_k) s = -g(y_k),   y_{k+1} = y_k + s

    The Jacobian is never formed: `jax.linearize` gives g'(y_k) as a function and
    the linear solver (GMRES by default) only calls Jacobian-vector products.
    Quadratic convergence near a solution with a nonsingular Jacobian. Each step
    costs one linearisation, one function evaluation and the solver's JVPs.

    Attributes:
      linear_solver: matrix-free solver for the Newton system.
    """

    linear_solver: AbstractLinearSolver = struct.field(
        pytree_node=False, default=GMRES(rtol=1e-10)
    )

    def init(self, fn, y0, args):
        return NewtonState(tu.tree_sub(fn(y0, args), y0))

    def step(self, fn, y, args, state):
        g = lambda z: tu.tree_sub(fn(z, args), z)
        _, jvp = jax.linearize(g, y)
        s = self.linear_solver.solve(jvp, tu.tree_scale(-1.0, state.residual))
        y = tu.tree_add(y, s)
        return y, NewtonState(g(y))
