"""Thin wrappers over `jax.scipy.sparse.linalg`: CG, GMRES and BiCGStab.

We do not re-implement Krylov methods; these classes only fix hyperparameters so
that a solver is a hashable value that can be passed to adjoints and Newton.
Convergence: `|b - A x| <= max(rtol * |b|, atol)` (2-norms), as in jax.scipy.
"""

import jax.scipy.sparse.linalg as jsl
from flax import struct

from .._checks import check_int, check_range
from ._base import AbstractLinearSolver


class _Krylov(AbstractLinearSolver):
    rtol: float = struct.field(pytree_node=False, default=1e-8)
    atol: float = struct.field(pytree_node=False, default=0.0)
    max_steps: int | None = struct.field(pytree_node=False, default=None)

    def _check(self):
        name = type(self).__name__
        check_range(name, "rtol", self.rtol, lo=0.0)
        check_range(name, "atol", self.atol, lo=0.0)
        if self.max_steps is not None:
            check_int(name, "max_steps", self.max_steps, 1)


class CG(_Krylov):
    """Conjugate gradients (A must be symmetric positive definite).

    Attributes:
      rtol, atol: stopping tolerances on the residual norm.
      max_steps: iteration cap (jax.scipy's default, 10 * n, when None).
    """

    def __post_init__(self):
        self._check()

    def solve(self, matvec, b):
        return jsl.cg(matvec, b, tol=self.rtol, atol=self.atol, maxiter=self.max_steps)[
            0
        ]


class BiCGStab(_Krylov):
    """Biconjugate gradient stabilised (general square A)."""

    def __post_init__(self):
        self._check()

    def solve(self, matvec, b):
        return jsl.bicgstab(
            matvec, b, tol=self.rtol, atol=self.atol, maxiter=self.max_steps
        )[0]


class GMRES(_Krylov):
    """Restarted GMRES (general square A).

    Attributes:
      restart: Krylov subspace size between restarts.
      max_steps: number of restarts (jax.scipy's `maxiter`).
      solve_method: jax.scipy's 'batched' (default) or 'incremental'.
    """

    restart: int = struct.field(pytree_node=False, default=20)
    solve_method: str = struct.field(pytree_node=False, default="batched")

    def __post_init__(self):
        self._check()
        check_int("GMRES", "restart", self.restart, 1)
        if self.solve_method not in ("batched", "incremental"):
            raise ValueError(
                f"GMRES: `solve_method` must be 'batched' or 'incremental', "
                f"got {self.solve_method!r}"
            )

    def solve(self, matvec, b):
        return jsl.gmres(
            matvec,
            b,
            tol=self.rtol,
            atol=self.atol,
            restart=self.restart,
            maxiter=self.max_steps,
            solve_method=self.solve_method,
        )[0]
