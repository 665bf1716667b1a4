"""Matrix-free linear solvers: `solver.solve(matvec, b) -> x` with `matvec(x) = A x`.

`matvec` is a linear function on pytrees (never a materialised matrix); `b` is a
pytree like its input. Every solver can be used as the `solve` and `transpose_solve`
of `jax.lax.custom_linear_solve`, which is how the implicit adjoint uses them.
"""

import abc
from typing import NamedTuple

import jax
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
    """Base class of the linear solvers (floats are leaves, ints static).

    `converged` is never "finite": it means the residual |b - A x| reached the
    solver's tolerance. A right-hand side that is not finite gives x = NaN and
    `converged` False (`nan_in_nan_out`), never the loop's start x = 0.
    """

    def solve(self, matvec, b):
        """Approximately solve `matvec(x) = b` for `x`."""
        return self.solve_with_stats(matvec, b)[0]

    @abc.abstractmethod
    def solve_with_stats(self, matvec, b, rtol=None):
        """`(x, LinearStats)`. `rtol`, when given (it may be traced), replaces the
        solver's relative tolerance where the solver supports it (CG); others
        ignore it."""


def nan_in_nan_out(b, x, stats):
    """`(x, stats)` with x NaN and the solve not converged where `b` or `x` is not
    finite: the Krylov loops read a NaN residual norm as "stop" and return
    their start, x = 0, which is a finite wrong answer."""
    finite_b = tu.all_finite(b)
    x = tu.tree_map(lambda a: jnp.where(finite_b, a, jnp.nan), x)
    ok = finite_b & tu.all_finite(x)
    return x, stats._replace(converged=stats.converged & ok)


def residual_within(matvec, b, x, tol):
    """|b - A x|₂ <= tol, recomputed (one product): the test of a solver whose
    loop does not report it. A tolerance below the rounding error of computing
    b - A x itself (16 ε (|A x| + |b|), float32's floor) cannot be checked, so
    that floor stands in for it."""
    ax = matvec(x)
    eps = max(float(jnp.finfo(jnp.result_type(a)).eps) for a in jax.tree.leaves(b))
    floor = 16 * eps * (tu.two_norm(ax) + tu.two_norm(b))
    return tu.two_norm(tu.tree_sub(b, ax)) <= jnp.maximum(tol, floor)
