"""Krylov solvers: CG (our own loop), GMRES and BiCGStab (`jax.scipy` wrappers).

CG is written out so that it can count its products and detect a matrix that is
not positive definite (p·Ap <= 0), which jax.scipy's CG would silently turn into
a wrong answer; GMRES and BiCGStab wrap `jax.scipy.sparse.linalg`. The classes fix
hyperparameters so that a solver is a hashable value for adjoints and Newton.
Convergence: `|b - A x| <= max(rtol * |b|, atol)` (2-norms), as in jax.scipy. The
default `rtol=None` is max(1e-8, 10 ε) for the dtype of `b`: 1e-8 in float64 and
about 1e-6 in float32, where 1e-8 is out of reach and would run to `max_steps`.
"""

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsl

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from ._base import AbstractLinearSolver, LinearStats
from .preconditioners import as_preconditioner


def _identity(r):
    return r


def default_rtol(b):
    leaves = jax.tree_util.tree_leaves(b)
    eps = max(float(jnp.finfo(jnp.result_type(x)).eps) for x in leaves)
    return max(1e-8, 10 * eps)


class _Krylov(AbstractLinearSolver):
    rtol: float | None = None
    atol: float = 0.0
    max_steps: int | None = struct.field(pytree_node=False, default=None)
    preconditioner: object = struct.field(pytree_node=False, default=None)

    def _rtol(self, b):
        return default_rtol(b) if self.rtol is None else self.rtol

    def _preconditioner(self, matvec, b):
        """`(apply, build cost, cost per application)`; the identity by default."""
        pre = as_preconditioner(self.preconditioner)
        return (_identity, 0, 0) if pre is None else pre.build(matvec, b)

    def _check(self):
        name = type(self).__name__
        as_preconditioner(self.preconditioner)
        if self.rtol is not None:
            check_range(name, "rtol", self.rtol, lo=0.0)
        check_range(name, "atol", self.atol, lo=0.0)
        if self.max_steps is not None:
            check_int(name, "max_steps", self.max_steps, 1)


class CG(_Krylov):
    """Conjugate gradients (A must be symmetric, or Hermitian, positive definite).

    From x_0 = 0, r_0 = p_0 = b, one product per step:

        α = |r|² / p·Ap,  x += α p,  r -= α Ap,  p = r + (|r_new|² / |r|²) p.

    A step with p·Ap <= 0 proves A is not positive definite: the solve stops there
    and reports `breakdown` in `solve_with_stats`; `solve` then returns NaN rather
    than a wrong answer (an implicit gradient through an indefinite Hessian is
    meaningless: use GMRES or BiCGStab there).

    With a `preconditioner` M (symmetric positive definite) it is preconditioned
    CG: z = M r takes r's place in the directions and in α, β.

    `restart=k + 1` sets β = 0 every k + 1 steps: each cycle then minimises
    ½ xᵀA x - bᵀx over x_t + K_{k+1}(A, r_t), the gradient method with the
    adaptively chosen polynomial preconditioner of degree k of Doikov &
    Rodomanov ("Polynomial Preconditioning for Gradient Methods", 2023: the
    polynomial re-chosen at every step by that Krylov minimisation). It never
    needs fewer products than CG (restart=None), whose space is larger.

    Attributes:
      rtol, atol: stopping tolerances on the residual norm (rtol=None: dtype-aware).
      max_steps: iteration cap (10 * n when None, as jax.scipy).
      preconditioner: None, `JacobiPreconditioner()`,
        `ChebyshevPreconditioner(degree)` or a function r -> M r
        (all three Krylov solvers take it).
      restart: None, or the steps per cycle (>= 1; 1 is steepest descent).
    """

    restart: int | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        self._check()
        if self.restart is not None:
            check_int("CG", "restart", self.restart, 1)

    def solve(self, matvec, b):
        x, stats = self.solve_with_stats(matvec, b)
        return tu.tree_map(lambda a: jnp.where(stats.breakdown, jnp.nan, a), x)

    def solve_with_stats(self, matvec, b, rtol=None):
        size = sum(jnp.size(a) for a in jax.tree_util.tree_leaves(b))
        max_steps = 10 * size if self.max_steps is None else self.max_steps
        dot = lambda u, v: jnp.real(tu.tree_vdot(u, v))
        apply, cost, per_apply = self._preconditioner(matvec, b)
        rs0 = dot(b, b)
        rtol = self._rtol(b) if rtol is None else rtol
        tol2 = jnp.maximum(rtol**2 * rs0, self.atol**2)

        def cond(c):
            _, _, _, _, rs, k, ok = c
            return (rs > tol2) & (k < max_steps) & ok

        def body(c):
            x, r, p, rz, rs, k, _ = c
            ap = matvec(p)
            pap = dot(p, ap)
            ok = pap > 0
            alpha = jnp.where(ok, rz / jnp.where(ok, pap, 1), 0)
            x = tu.tree_axpy(alpha, p, x)
            r = tu.tree_axpy(-alpha, ap, r)
            z = apply(r)
            rz_new = dot(r, z)
            beta = rz_new / jnp.where(rz > 0, rz, 1)
            if self.restart is not None:  # a new cycle starts from the gradient
                beta = jnp.where((k + 1) % self.restart == 0, 0.0, beta)
            p = tu.tree_axpy(beta, p, z)
            rs_new = dot(r, r)
            return (
                x,
                r,
                p,
                jnp.where(ok, rz_new, rz),
                jnp.where(ok, rs_new, rs),
                k + 1,
                ok,
            )

        z0 = apply(b)
        zero, yes = jnp.int32(0), jnp.array(True)
        init = (tu.tree_zeros_like(b), b, z0, dot(b, z0), rs0, zero, yes)
        x, _, _, _, rs, k, ok = jax.lax.while_loop(cond, body, init)
        # products: one per step, plus the preconditioner's (built once, applied
        # at the start and once per step)
        matvecs = k * (1 + per_apply) + cost + per_apply
        return x, LinearStats(matvecs, ok & (rs <= tol2), ~ok)


class BiCGStab(_Krylov):
    """Biconjugate gradient stabilised (general square A)."""

    def __post_init__(self):
        self._check()

    def solve(self, matvec, b):
        apply = self._preconditioner(matvec, b)[0]
        return jsl.bicgstab(
            matvec,
            b,
            tol=self._rtol(b),
            atol=self.atol,
            maxiter=self.max_steps,
            M=apply,
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
        apply = self._preconditioner(matvec, b)[0]
        return jsl.gmres(
            matvec,
            b,
            M=apply,
            tol=self._rtol(b),
            atol=self.atol,
            restart=self.restart,
            maxiter=self.max_steps,
            solve_method=self.solve_method,
        )[0]
