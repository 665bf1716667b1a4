"""Matrix-free linear solvers: `solver.solve(matvec, b) -> x` with `matvec(x) = A x`.

`matvec` is a linear function on pytrees (never a materialised matrix); `b` is a
pytree like its input. Every solver can be used as the `solve` and `transpose_solve`
of `jax.lax.custom_linear_solve`, which is how the implicit adjoint uses them.
"""

import abc
from typing import NamedTuple

import jax.numpy as jnp

from .. import _tree as tu
from .._module import Module
from .._types import Array, Bool, Int


class LinearStats(NamedTuple):
    """What a linear solve cost and whether it succeeded."""

    num_matvecs: Int[Array, ""]  # -1 where the solver does not report it
    converged: Bool[Array, ""]  # the residual reached the tolerance
    breakdown: Bool[Array, ""]  # the method failed (CG: A not positive definite)


class AbstractLinearSolver(Module):
    """Base class of the linear solvers (floats are leaves, ints static)."""

    @abc.abstractmethod
    def solve(self, matvec, b):
        """Approximately solve `matvec(x) = b` for `x`."""

    def solve_with_stats(self, matvec, b, rtol=None):
        """`(x, LinearStats)`. `rtol`, when given (it may be traced), replaces the
        solver's relative tolerance where the solver supports it (CG); others
        ignore it. This default (the `jax.scipy` wrappers, which do not say)
        reports -1 products and `converged` = x is finite."""
        x = self.solve(matvec, b)
        finite = jnp.isfinite(tu.two_norm(x))
        return x, LinearStats(jnp.int32(-1), finite, ~finite)
