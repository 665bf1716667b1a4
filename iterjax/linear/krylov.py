"""Thin wrappers over `jax.scipy.sparse.linalg`: CG, GMRES and BiCGStab.

We do not re-implement Krylov methods; these classes only fix hyperparameters so
that a solver is a hashable value that can be passed to adjoints and Newton.
Convergence: `|b - A x| <= max(rtol * |b|, atol)` (2-norms), as in jax.scipy. The
default `rtol=None` is max(1e-8, 10 ε) for the dtype of `b`: 1e-8 in float64 and
about 1e-6 in float32, where 1e-8 is out of reach and would run to `max_steps`.
"""

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsl
from flax import struct

from .._checks import check_int, check_range
from ._base import AbstractLinearSolver


def default_rtol(b):
    leaves = jax.tree_util.tree_leaves(b)
    eps = max(float(jnp.finfo(jnp.result_type(x)).eps) for x in leaves)
    return max(1e-8, 10 * eps)


class _Krylov(AbstractLinearSolver):
    rtol: float | None = struct.field(pytree_node=False, default=None)
    atol: float = struct.field(pytree_node=False, default=0.0)
    max_steps: int | None = struct.field(pytree_node=False, default=None)

    def _rtol(self, b):
        return default_rtol(b) if self.rtol is None else self.rtol

    def _check(self):
        name = type(self).__name__
        if self.rtol is not None:
            check_range(name, "rtol", self.rtol, lo=0.0)
        check_range(name, "atol", self.atol, lo=0.0)
        if self.max_steps is not None:
            check_int(name, "max_steps", self.max_steps, 1)


class CG(_Krylov):
    """Conjugate gradients (A must be symmetric positive definite).

    Attributes:
      rtol, atol: stopping tolerances on the residual norm (rtol=None: dtype-aware).
      max_steps: iteration cap (jax.scipy's default, 10 * n, when None).
    """

    def __post_init__(self):
        self._check()

    def solve(self, matvec, b):
        return jsl.cg(
            matvec, b, tol=self._rtol(b), atol=self.atol, maxiter=self.max_steps
        )[0]


class BiCGStab(_Krylov):
    """Biconjugate gradient stabilised (general square A)."""

    def __post_init__(self):
        self._check()

    def solve(self, matvec, b):
        return jsl.bicgstab(
            matvec, b, tol=self._rtol(b), atol=self.atol, maxiter=self.max_steps
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
            tol=self._rtol(b),
            atol=self.atol,
            restart=self.restart,
            maxiter=self.max_steps,
            solve_method=self.solve_method,
        )[0]
