"""Solvers built on the fixed-point form x = b + (I - A) x of `A x = b`.

For the implicit adjoint, A = I - J^T with J the Jacobian of the fixed-point map,
so (I - A) = J^T and both solvers only need vector-Jacobian products:

* `Neumann(terms=k)`:  x = sum_{i=0}^{k} (I - A)^i b  (truncated Neumann series,
  Lorraine et al. 2020, "Optimizing Millions of Hyperparameters...").
* `Richardson()`: iterate x <- x + (b - A x) to tolerance: fixed-point iteration
  on the adjoint, the classical DEQ backward pass (Bai et al. 2019).

Both converge when the spectral radius of (I - A) is below one, i.e. when the
forward map is a contraction at the solution.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from .._iterate import AbstractFixedPointSolver, iterative_solve
from .._types import Y
from ._base import AbstractLinearSolver, LinearStats, checked_answer, nan_in_nan_out
from .krylov import default_rtol


class Neumann(AbstractLinearSolver):
    """Truncated Neumann series with `terms` matrix-vector products.

        x = α Σ_{i=0}^{k} (I - α A)^i b,   k = terms,

    which converges to A⁻¹ b when the spectral radius of I - αA is below one (for
    a Hessian: α < 2 / λ_max; α is the inner learning rate in Lorraine et al.).

    Attributes:
      terms: number of powers of (I - αA) beyond the identity.
      damping: α > 0 (1 for the implicit adjoint of a contraction).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A, b = jnp.array([[1.0, 0.2], [0.2, 1.0]]), jnp.array([1.0, 1.0])
      >>> x = iterjax.Neumann(terms=40).solve(A, b)  # ρ(I - A) = 0.2
      >>> bool(jnp.allclose(A @ x, b, atol=1e-5))
      True
    """

    terms: int = struct.field(pytree_node=False, default=10)
    damping: float = 1.0

    def __post_init__(self):
        check_int("Neumann", "terms", self.terms, 0)
        check_range("Neumann", "damping", self.damping, lo=0.0, lo_open=True)

    def solve(self, matvec, b):
        a = self.damping
        b = tu.tree_scale(a, b)

        def body(_, carry):
            x, term = carry
            term = tu.tree_axpy(-a, matvec(term), term)  # (I - αA) term
            return tu.tree_add(x, term), term

        x, _ = jax.lax.fori_loop(0, self.terms, body, (b, b))
        return x

    def solve_with_stats(self, matvec, b, rtol=None):
        """A fixed budget of `terms` products (a truncated series, approximate by
        design); `converged` says whether it reached |b - A x|₂ <= rtol |b|₂
        (rtol default: 1e-8 in float64), recomputed with one product more."""
        x = self.solve(matvec, b)
        rtol = default_rtol(b, rtol)
        return checked_answer(matvec, b, x, rtol * tu.two_norm(b), self.terms + 1)


class Richardson(AbstractLinearSolver):
    """Fixed-point (Richardson) iteration x <- x + damping * (b - A x).

    Runs on iterjax's own driver loop, stopping when |b - A x|_inf <= atol + rtol|x|.

    Attributes:
      damping: step size in (0, 1].
      atol, rtol, max_steps: as in `fixed_point`.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A, b = jnp.array([[1.0, 0.2], [0.2, 1.0]]), jnp.array([1.0, 1.0])
      >>> x, stats = iterjax.Richardson(atol=1e-6).solve_with_stats(A, b)
      >>> bool(stats.converged), bool(jnp.allclose(A @ x, b, atol=1e-5))
      (True, True)
    """

    transpose = "general"  # reverse mode: one more solve

    damping: float = 1.0
    atol: float = 1e-10
    rtol: float = 0.0
    max_steps: int = struct.field(pytree_node=False, default=1000)

    def __post_init__(self):
        check_range("Richardson", "damping", self.damping, 0.0, 1.0, lo_open=True)
        check_range("Richardson", "atol", self.atol, lo=0.0)
        check_range("Richardson", "rtol", self.rtol, lo=0.0)
        check_int("Richardson", "max_steps", self.max_steps, 1)

    def solve_with_stats(self, matvec, b, rtol=None):
        # fn(x) - x = b - A x: the driver's residual is the linear residual.
        fn = lambda x, _: tu.tree_add(x, tu.tree_sub(b, matvec(x)))
        sol = iterative_solve(
            _RichardsonStep(self.damping),
            fn,
            tu.tree_zeros_like(b),
            None,
            atol=self.atol,
            rtol=self.rtol,
            max_steps=self.max_steps,
        )
        broke = ~jnp.isfinite(sol.residual)
        stats = LinearStats(sol.num_steps + 1, sol.converged, broke)
        return nan_in_nan_out(b, sol.value, stats)


class _RichardsonState(NamedTuple):
    residual: Y  # b - A x


class _RichardsonStep(AbstractFixedPointSolver):
    """x <- x + damping (b - A x) as a driver solver (`linear` sits below
    `fixed_point`, so it does not use `fixed_point.Picard`)."""

    damping: float = 1.0

    def init(self, fn, y0, args):
        return _RichardsonState(tu.tree_sub(fn(y0, args), y0))

    def step(self, fn, y, args, state):
        y = tu.tree_axpy(self.damping, state.residual, y)
        return y, _RichardsonState(tu.tree_sub(fn(y, args), y))
