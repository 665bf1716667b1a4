"""Krylov solvers: CG and GMRES (our own loops), BiCGStab (`jax.scipy`'s).

CG is written out so that it can count its products and detect a matrix that is
not positive definite (p·Ap <= 0), which jax.scipy's CG would silently turn into
a wrong answer; GMRES so that it counts its products and reports convergence;
BiCGStab wraps `jax.scipy.sparse.linalg`. The classes fix
hyperparameters so that a solver is a hashable value for adjoints and Newton.
Convergence: `|b - A x| <= max(rtol * |b|, atol)` (2-norms), as in jax.scipy. The
default `rtol=None` is max(1e-8, 10 ε) for the dtype of `b`: 1e-8 in float64 and
about 1e-6 in float32, where 1e-8 is out of reach and would run to `max_steps`.
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import jax.scipy.sparse.linalg as jsl

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range, check_same_structure
from ._base import AbstractLinearSolver, LinearStats, checked_answer, nan_in_nan_out
from .preconditioners import AbstractPreconditioner, as_preconditioner

INDEFINITE = ("nan", "truncate")


def _identity(r):
    return r


def flat_system(matvec, b, rtol, atol):
    """(flat b, unravel, the operator on flat vectors, the residual tolerance
    max(rtol |b|₂, atol)): the form the Arnoldi-based solvers work in."""
    flat_b, unravel = tu.ravel(b)
    op = lambda v: tu.ravel(matvec(unravel(v)))[0]
    tol = jnp.maximum(rtol * jnp.linalg.norm(flat_b), atol)
    return flat_b, unravel, op, tol


def check_square(owner, matvec, b):
    """ValueError unless `matvec` maps vectors shaped like `b` to the same shapes
    (a square system)."""
    what = "`matvec` (a square system: A x shaped like b)"
    check_same_structure(owner, what, jax.eval_shape(matvec, b), b, "b")


def default_rtol(b, *given):
    """The first of `given` that is not None (a call's rtol, then the solver's
    own), else max(1e-8, 10 ε) for the dtype of `b`."""
    for rtol in given:
        if rtol is not None:
            return rtol
    leaves = jax.tree_util.tree_leaves(b)
    eps = max(float(jnp.finfo(jnp.result_type(x)).eps) for x in leaves)
    return max(1e-8, 10 * eps)


class _Krylov(AbstractLinearSolver):
    rtol: float | None = None
    atol: float = 0.0
    max_steps: int | None = struct.field(pytree_node=False, default=None)
    preconditioner: AbstractPreconditioner | Callable | None = struct.field(
        pytree_node=False, default=None
    )

    def prepared(self, matvec):
        pre = as_preconditioner(self.preconditioner)
        ready = None if pre is None else pre.prepared(matvec)
        return self if ready is pre else self.replace(preconditioner=ready)

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
    and reports `breakdown`, with x = NaN rather than a wrong answer (inside the
    solve, so that its derivatives are NaN too: an implicit gradient through an
    indefinite Hessian is meaningless; use GMRES or BiCGStab there).

    `indefinite="truncate"` returns instead the iterate before that step, or the
    first direction (b; M b preconditioned) if it is the first step: the inner
    loop of line-search Newton-CG (Nocedal & Wright 2006, Algorithm 7.1; scipy's
    Newton-CG). For a Newton system H s = -∇L every CG iterate from 0 before a
    direction of non-positive curvature is a descent direction of L (each lowers
    the quadratic model ½ sᵀHs + ∇Lᵀs, which is 0 at s = 0), and so is b = -∇L
    (and M b): a step that a line search can shorten, where plain CG gives NaN.
    It is not a solution of A x = b (reported not converged, `breakdown`): not
    for an implicit adjoint.

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
      indefinite: on p·Ap <= 0, "nan" (default: x = NaN) or "truncate" (the
        iterate so far; the first direction at the first step).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A, b = jnp.array([[4.0, 1.0], [1.0, 3.0]]), jnp.array([1.0, 2.0])
      >>> x, stats = iterjax.CG().solve_with_stats(A, b)  # A: a matrix or a function
      >>> bool(stats.converged), bool(jnp.allclose(A @ x, b))
      (True, True)
    """

    transpose = "symmetric"  # reverse mode: one more solve

    restart: int | None = struct.field(pytree_node=False, default=None)
    indefinite: str = struct.field(pytree_node=False, default="nan")

    def __post_init__(self):
        self._check()
        if self.restart is not None:
            check_int("CG", "restart", self.restart, 1)
        if self.indefinite not in INDEFINITE:
            raise ValueError(
                f"CG: `indefinite` must be one of {INDEFINITE}, got {self.indefinite!r}"
            )

    def solve_with_stats(self, matvec, b, rtol=None):
        size = sum(jnp.size(a) for a in jax.tree_util.tree_leaves(b))
        max_steps = 10 * size if self.max_steps is None else self.max_steps
        dot = lambda u, v: jnp.real(tu.tree_vdot(u, v))
        apply, cost, per_apply = self._preconditioner(matvec, b)
        rs0 = dot(b, b)
        rtol = default_rtol(b, rtol, self.rtol)
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
            if self.indefinite == "truncate":  # the first direction is b
                alpha = jnp.where(ok | (k > 0), alpha, 1)
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
        if self.indefinite == "nan":  # A not positive definite: NaN
            x = tu.tree_map(lambda a: jnp.where(ok, a, jnp.nan), x)
        return nan_in_nan_out(b, x, LinearStats(matvecs, ok & (rs <= tol2), ~ok))


class BiCGStab(_Krylov):
    """Biconjugate gradient stabilised (general square A).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A, b = jnp.array([[4.0, 1.0], [-2.0, 3.0]]), jnp.array([1.0, 2.0])
      >>> x, stats = iterjax.BiCGStab().solve_with_stats(A, b)  # A nonsymmetric
      >>> bool(stats.converged), bool(jnp.allclose(A @ x, b))
      (True, True)
    """

    def __post_init__(self):
        self._check()

    def solve_with_stats(self, matvec, b, rtol=None):
        """jax.scipy's loop, which reports nothing: `converged` is the residual
        recomputed (one product more); -1 products."""
        apply = self._preconditioner(matvec, b)[0]
        rtol = default_rtol(b, rtol, self.rtol)
        x = jsl.bicgstab(
            matvec, b, tol=rtol, atol=self.atol, maxiter=self.max_steps, M=apply
        )[0]
        tol = jnp.maximum(rtol * tu.two_norm(b), self.atol)
        return checked_answer(matvec, b, x, tol, -1)


class GMRES(_Krylov):
    """Restarted GMRES(m) (general square A), right-preconditioned.

    Each cycle runs Arnoldi on A M from the residual r (`arnoldi`: classical
    Gram-Schmidt, stopped early by GMRES's residual estimate), then
    x ← x + M V y with y = argmin |β e_1 - H̄ y| (`hessenberg_lstsq`), and
    recomputes r = b - A x (one product), whose norm is the convergence test:
    the stopping rule never trusts the estimate or the basis's orthogonality.
    The loop is wrapped in `jax.lax.custom_linear_solve`, so it is
    differentiated implicitly (the transposed system, solved by the same
    GMRES), as jax.scipy's is, and it counts its products.

    Attributes:
      restart: m, the Krylov subspace size between restarts.
      reorthogonalise: Gram-Schmidt twice per step (an orthonormal basis to
        working precision, "twice is enough", Giraud et al. 2005) instead of
        once, as lineax, jax.scipy and PETSc's default do. Each pass reads the
        whole basis, (m + 1) n numbers, which costs far more than a stencil
        product: twice takes 1.7x the time per step (benchmarks/linear.py).
        Once loses orthogonality as κ(A) grows, which slows convergence (the
        residual tested is the true one); set True for ill-conditioned systems
        that stagnate.
      max_steps: cap on restart cycles (jax.scipy's `maxiter`, and its default
        10 n when None).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A, b = jnp.array([[4.0, 1.0], [-2.0, 3.0]]), jnp.array([1.0, 2.0])
      >>> x, stats = iterjax.GMRES(restart=2).solve_with_stats(lambda v: A @ v, b)
      >>> bool(stats.converged), bool(jnp.allclose(A @ x, b))
      (True, True)
    """

    restart: int = struct.field(pytree_node=False, default=20)
    reorthogonalise: bool = struct.field(pytree_node=False, default=False)

    def __post_init__(self):
        self._check()
        check_int("GMRES", "restart", self.restart, 1)
        if not isinstance(self.reorthogonalise, bool):
            raise TypeError(
                f"GMRES: `reorthogonalise` must be a bool, got {self.reorthogonalise!r}"
            )

    def solve_with_stats(self, matvec, b, rtol=None):
        solve = self._solve(matvec, b, rtol)
        x, stats = jax.lax.custom_linear_solve(
            matvec, b, solve, transpose_solve=solve, has_aux=True
        )
        return nan_in_nan_out(b, x, LinearStats(*stats))

    def solve_loop(self, matvec, b, rtol=None):
        x, stats = self._solve(matvec, b, rtol)(matvec, b)
        return nan_in_nan_out(b, x, LinearStats(*stats))

    def _solve(self, matvec, b, rtol):
        """The restart cycles as a function (matvec, b) -> (x, stats), with the
        preconditioner built from the operator as given (a matrix's diagonal, a
        grid to coarsen), which custom_linear_solve hands its transposed solve
        only as a function."""
        check_square("GMRES", matvec, b)
        rtol = default_rtol(b, rtol, self.rtol)
        pre = self._preconditioner(matvec, b)
        return lambda mv, rhs: self._cycles(mv, rhs, rtol, pre)

    def _cycles(self, matvec, b, rtol, preconditioner):
        flat_b, unravel, op, tol = flat_system(matvec, b, rtol, self.atol)
        apply, cost, per_apply = preconditioner
        pre = lambda v: tu.ravel(apply(unravel(v)))[0]
        n = flat_b.shape[0]
        m = min(self.restart, n)
        max_cycles = 10 * n if self.max_steps is None else self.max_steps
        none = jnp.zeros((n, 0), flat_b.dtype)  # no recycled space (GCRO-DR's C)

        def cond(c):
            _, _, norm, j, _ = c
            return (norm > tol) & (j < max_cycles)

        def body(c):
            x, r, _, j, products = c
            passes = 2 if self.reorthogonalise else 1
            V, H, _, steps = arnoldi(lambda v: op(pre(v)), r, none, m, tol, passes)
            y = hessenberg_lstsq(H, jnp.linalg.norm(r), steps)
            x = x + pre(V[:m].T @ y)
            r = flat_b - op(x)
            spent = steps * (1 + per_apply) + per_apply + 1
            return x, r, jnp.linalg.norm(r), j + 1, products + spent

        start = (
            jnp.zeros_like(flat_b),
            flat_b,
            jnp.linalg.norm(flat_b),
            jnp.int32(0),
            jnp.int32(cost),
        )
        x, _, norm, _, products = jax.lax.while_loop(cond, body, start)
        finite = jnp.isfinite(norm)
        return unravel(x), (products, finite & (norm <= tol), ~finite)


def hessenberg_lstsq(H, beta, steps):
    """argmin_y |β e_1 - H̄ y| for Arnoldi's H̄ (s + 1, s), over the `steps`
    columns reached (y is zero on the others).

    Column k >= steps is replaced by e_{k+1}, which meets no row that a reached
    column does, so that the problem splits and those y_k are 0; then one QR
    and a triangular solve (a tenth of an SVD's time at s = 50), or least
    squares by SVD where R is singular (A singular on the Krylov space)."""
    s = H.shape[1]
    H = jnp.where(
        jnp.arange(s, dtype=jnp.int32) < steps, H, jnp.eye(s + 1, s, -1, dtype=H.dtype)
    )
    rhs = jnp.zeros(s + 1, H.dtype).at[0].set(beta.astype(H.dtype))
    Q, R = jnp.linalg.qr(H)
    d = jnp.abs(jnp.diag(R))
    regular = jnp.all(d > s * jnp.finfo(H.dtype).eps * jnp.max(d))
    return jax.lax.cond(
        regular,
        lambda: jax.scipy.linalg.solve_triangular(R, Q.conj().T @ rhs),
        lambda: jnp.linalg.lstsq(H, rhs)[0],
    )


def arnoldi(op, r, C, s, tol, passes=2):
    """Arnoldi on (I - C Cᴴ) A from r / |r| until GMRES's residual estimate is
    within `tol`, at most s steps: (the basis as rows V (s + 1, n),
    H̄ (s + 1, s), B = Cᴴ A Vᵀ (k, s), steps), zero beyond the steps taken.
    Classical Gram-Schmidt against the basis so far, `passes` times (1 or 2).
    C (n, k) may have k = 0 columns (GMRES).

    The estimate: the least-squares residual of min |β e_1 - H̄ y| lies along
    the left null vector w of H̄ (wᴴ H̄ = 0, w_1 = 1), so its norm is β / |w|;
    each step adds one entry, w_{j+1} = -conj(wᴴ h_j) / h_{j+1,j}."""
    beta = jnp.linalg.norm(r)
    V = jnp.zeros((s + 1, r.shape[0]), r.dtype).at[0].set(r / beta.astype(r.dtype))
    H = jnp.zeros((s + 1, s), r.dtype)
    B = jnp.zeros((C.shape[1], s), r.dtype)
    w = jnp.zeros(s + 1, r.dtype).at[0].set(1.0)

    def cond(c):
        *_, estimate, j = c
        return (j < s) & (estimate > tol)

    def body(c):
        V, H, B, w, _, j = c
        v = op(V[j])
        bj = C.conj().T @ v
        v = v - C @ bj
        h = jnp.zeros(V.shape[0], v.dtype)
        for _ in range(passes):
            hp = V.conj() @ v  # V's rows beyond j are zero
            v, h = v - hp @ V, h + hp
        norm = jnp.linalg.norm(v)
        safe = jnp.where(norm > 0, norm, 1.0).astype(v.dtype)
        h = h.at[j + 1].set(norm.astype(h.dtype))
        V = V.at[j + 1].set(v / safe)
        # a breakdown (norm 0) means the Krylov space holds the solution
        w = w.at[j + 1].set(-jnp.conj(jnp.vdot(w, h)) / safe)
        estimate = jnp.where(norm > 0, beta / jnp.linalg.norm(w), 0.0)
        return V, H.at[:, j].set(h), B.at[:, j].set(bj), w, estimate, j + 1

    V, H, B, _, _, steps = jax.lax.while_loop(
        cond, body, (V, H, B, w, beta, jnp.int32(0))
    )
    return V, H, B, steps
