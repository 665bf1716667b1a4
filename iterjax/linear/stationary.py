"""Stationary iterations: SOR and SSOR on operators that expose their splitting.

SOR (successive over-relaxation) for A x = b, A = D + L + U (diagonal, strictly
lower and upper parts), updates every unknown in order from its newest neighbours:

    (D + ω L) x_{k+1} = ω b - (ω U + (ω - 1) D) x_k,          ω in (0, 2)

ω = 1 is Gauss-Seidel. For consistently ordered matrices (the 5-point Laplacian in
natural or red-black order among them) Young's theory gives the spectral radius of
the iteration as a function of ω and of ρ_J, Jacobi's: at the optimum
ω* = 2 / (1 + sqrt(1 - ρ_J²)) it is ω* - 1 (for the model Poisson problem on an
n x n grid, ρ_J = cos(π h), h = 1 / (n + 1)). SSOR follows each forward sweep by a
backward one (a symmetric iteration, the usual smoother and preconditioner).

An operator gives the sweep (`diagonal()` and `sweep(x, b, omega, backward)`):
`MatrixOperator(A)` (a dense matrix: triangular solves) or
`iterjax.gallery.Poisson2D(k)` (the matrix-free 5-point operator -∇·(k∇u) on a
grid with zero boundary values, swept in red-black order: each colour is one
parallel update, so a sweep has depth 2 whatever the grid). The iterations run
on iterjax's driver: jit, vmap (per-element step counts) and the stopping rule
|x_{k+1} - x_k| / min(ω, 1) <= atol + rtol |x_k| come with it (a small ω makes
small updates far from the solution: over ω, the update is the residual
preconditioned by D + ωL).
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
import jax.scipy.linalg as jsla

from .. import _struct as struct
from .._checks import check_int, check_range
from .._iterate import AbstractFixedPointSolver, iterative_solve
from .._types import Y


class MatrixOperator(struct.PyTreeNode):
    """A dense square matrix with its splitting.

    Attributes:
      matrix: (n, n), with a nonzero diagonal.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A = iterjax.linear.MatrixOperator(jnp.array([[4.0, 1.0], [1.0, 3.0]]))
      >>> sol = iterjax.linear.SOR(1.0, atol=1e-6).solve(A, jnp.array([1.0, 2.0]))
      >>> bool(sol.converged), bool(jnp.allclose(A(sol.value), jnp.array([1.0, 2.0])))
      (True, True)
    """

    matrix: jax.Array

    def __call__(self, x):
        return self.matrix @ x

    def diagonal(self):
        return jnp.diagonal(self.matrix)

    def sweep(self, x, b, omega, backward=False):
        """One SOR sweep in natural order (backward: in reverse order)."""
        a = self.matrix
        d = jnp.diag(jnp.diagonal(a))
        lower, upper = jnp.tril(a, -1), jnp.triu(a, 1)
        if backward:
            lower, upper = upper, lower
        rhs = omega * b - (omega * upper + (omega - 1) * d) @ x
        return jsla.solve_triangular(d + omega * lower, rhs, lower=not backward)


class _SweepState(NamedTuple):
    update: Y  # sweep(x) - x
    residual: Y  # the update, over ω where ω < 1 (the stopping test's quantity)


class _Sweep(AbstractFixedPointSolver):
    """The driver's step: x <- sweep(x) (fn is the sweep map itself).

    The update of a sweep is ω (D + ωL)⁻¹ (b - A x): with a small ω it is small
    however far x is from the solution, so the stopping test reads it over ω
    where ω < 1 (the residual preconditioned by D + ωL), and as it is else.
    """

    omega: float

    def _state(self, update):
        return _SweepState(update, update / jnp.minimum(self.omega, 1.0))

    def init(self, fn, y0, args):
        return self._state(fn(y0, args) - y0)

    def step(self, fn, y, args, state):
        y = y + state.update
        return y, self._state(fn(y, args) - y)


class SOR(struct.PyTreeNode):
    """Successive over-relaxation (SSOR with `symmetric=True`).

    `solve(operator, b)` returns the `Solution` of the driver (value, converged,
    num_steps, residual = |x_{k+1} - x_k|, trace).

    Attributes:
      omega: ω in (0, 2).
      symmetric: a forward then a backward sweep per step (SSOR).
      atol, rtol, max_steps: the stopping rule on the update size (over ω
        where ω < 1).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A = iterjax.gallery.Poisson2D(jnp.ones((15, 15)))  # exposes red-black sweeps
      >>> omega = iterjax.linear.optimal_omega(jnp.cos(jnp.pi / 16))  # ρ_J on 15 x 15
      >>> sor = iterjax.linear.SOR(omega=float(omega), atol=1e-4)
      >>> sol = sor.solve(A, jnp.ones((15, 15)))
      >>> bool(sol.converged), int(sol.num_steps) < 100
      (True, True)
    """

    omega: float = 1.0
    symmetric: bool = struct.field(pytree_node=False, default=False)
    atol: float = 1e-10
    rtol: float = 0.0
    max_steps: int = struct.field(pytree_node=False, default=10_000)

    def __post_init__(self):
        check_range("SOR", "omega", self.omega, 0.0, 2.0, True, True)
        check_range("SOR", "atol", self.atol, lo=0.0)
        check_range("SOR", "rtol", self.rtol, lo=0.0)
        check_int("SOR", "max_steps", self.max_steps, 1)

    def iteration(self, operator, b):
        """The map x -> x_{k+1} of one step."""

        def step(x, _):
            x = operator.sweep(x, b, self.omega)
            if self.symmetric:
                x = operator.sweep(x, b, self.omega, backward=True)
            return x

        return step

    def solve(self, operator, b, x0=None, trace=False):
        if not hasattr(operator, "sweep"):
            raise TypeError(
                "SOR: the operator must expose its splitting (`sweep`): "
                "MatrixOperator or iterjax.gallery.Poisson2D, got "
                f"{type(operator).__name__}"
            )
        x0 = jnp.zeros_like(b) if x0 is None else x0
        return iterative_solve(
            _Sweep(self.omega),
            self.iteration(operator, b),
            x0,
            None,
            atol=self.atol,
            rtol=self.rtol,
            max_steps=self.max_steps,
            trace=trace,
        )


def optimal_omega(rho_jacobi):
    """Young's ω* = 2 / (1 + sqrt(1 - ρ_J²)) for a consistently ordered matrix
    whose Jacobi iteration has spectral radius ρ_J < 1.

    Example:
      >>> import iterjax
      >>> round(float(iterjax.linear.optimal_omega(0.9)), 4)
      1.3929
    """
    return 2.0 / (1.0 + jnp.sqrt(1.0 - rho_jacobi**2))
