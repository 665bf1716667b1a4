"""Sketch-and-project (Gower & Richtárik): in the A-norm for symmetric positive
definite systems (`SketchAndProject`), in the Euclidean norm for any square
nonsingular one (`BlockKaczmarz`)."""

import math

import jax
import jax.numpy as jnp
from jax.experimental import sparse

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from ._base import (
    AbstractLinearSolver,
    LinearStats,
    MatrixMatvec,
    checked_answer,
    nan_in_nan_out,
)
from .krylov import default_rtol


class _Sketching(AbstractLinearSolver):
    """The hyperparameters and checks that both sketching solvers share."""

    block: int = struct.field(pytree_node=False, default=32)
    rtol: float | None = None
    max_epochs: int = struct.field(pytree_node=False, default=1000)
    seed: int = struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        name = type(self).__name__
        check_int(name, "block", self.block, 1)
        check_int(name, "max_epochs", self.max_epochs, 1)
        if self.rtol is not None:
            check_range(name, "rtol", self.rtol, lo=0.0)


class SketchAndProject(_Sketching):
    """Randomized block coordinate descent: sketch-and-project in the A-norm.

    Each step draws τ coordinates S at random and solves the τ x τ block
    exactly, which projects x onto {x : Sᵀ(A x - b) = 0} in the A-norm:

        x_S ← x_S - (A_SS)⁻¹ r_S,    r ← r - A_{:,S} (A_SS)⁻¹ r_S,   r = A x - b,

    with the residual kept up to date at n τ operations a step, so an epoch
    (⌈n/τ⌉ steps) costs about one product with A. It converges linearly for
    every symmetric positive definite A, at a rate set by the blocks' coverage
    of the spectrum (Gower & Richtárik 2015); for dense, well-structured systems
    (kernel matrices) it needs no product with the whole matrix per step.

    Needs A as a dense matrix (its blocks are read). Stops when |r|₂ <= rtol
    |b|₂; `converged` is then checked with one more product, on the true
    residual (the updated one drifts by rounding).

    Attributes:
      block: τ, coordinates per step (at most n).
      rtol: relative residual tolerance (None: 1e-8 in float64).
      max_epochs: passes of ⌈n/τ⌉ steps at most.
      seed: the sampling's PRNG seed.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A = jnp.eye(50) + 0.5 * jnp.ones((50, 50)) / 50   # dense, SPD
      >>> solver = iterjax.linear.SketchAndProject(block=10, rtol=1e-5)
      >>> x, stats = solver.solve_with_stats(A, jnp.ones(50))
      >>> bool(stats.converged), bool(jnp.allclose(A @ x, 1.0, atol=1e-4))
      (True, True)
    """

    def solve_with_stats(self, matvec, b, rtol=None):
        A = matvec.matrix if isinstance(matvec, MatrixMatvec) else None
        if A is None or isinstance(A, sparse.BCOO):
            raise TypeError(
                "SketchAndProject: the operator must be a dense matrix (its blocks "
                "are read), got a function or a sparse matrix"
            )
        b = jnp.asarray(b)
        if b.ndim != 1 or b.shape[0] != A.shape[0]:
            raise ValueError(
                f"SketchAndProject: `b` must be a vector of {A.shape[0]} entries, "
                f"got shape {b.shape}"
            )
        n = b.shape[0]
        tau = min(self.block, n)
        steps = math.ceil(n / tau)
        rtol = default_rtol(b, rtol, self.rtol)
        tol = rtol * jnp.linalg.norm(b)

        def step(_, carry):
            x, r, key = carry
            key, sub = jax.random.split(key)
            S = jax.random.choice(sub, n, (tau,), replace=False)
            block = A[S][:, S]
            delta = -jax.scipy.linalg.cho_solve(
                jax.scipy.linalg.cho_factor(block), r[S]
            )
            return x.at[S].add(delta), r + A[:, S] @ delta, key

        def epoch(state):
            x, r, k, key = state
            x, r, key = jax.lax.fori_loop(0, steps, step, (x, r, key))
            return x, r, k + 1, key

        def going(state):
            _, r, k, _ = state
            return (jnp.linalg.norm(r) > tol) & (k < self.max_epochs)

        start = (jnp.zeros_like(b), -b, jnp.int32(0), jax.random.key(self.seed))
        x, _, epochs, _ = jax.lax.while_loop(going, epoch, start)
        return checked_answer(matvec, b, x, tol, epochs + 1)


class BlockKaczmarz(_Sketching):
    """Randomized block Kaczmarz: sketch-and-project in the Euclidean norm, for
    any square nonsingular A (symmetric indefinite ones, such as the KKT
    systems of constrained Newton methods, included).

    Each step takes τ rows S and projects x onto {x : A_S x = b_S}:

        x ← x + A_Sᵀ (A_S A_Sᵀ)⁺ (b_S - A_S x),

    the rows drawn as a fresh random permutation every epoch (⌈n/τ⌉ steps).
    The error |x - x*|₂ falls linearly in expectation, at a rate set by
    σ_min(A) relative to the rows' norms (Needell & Tropp 2014; Gower &
    Richtárik 2015); the sketched inexact Newton of Hong, Na, Mahoney & Kolar
    (2023) solves its Lagrangian Newton systems this way: `Newton(BlockKaczmarz(),
    forcing=...)` on the KKT map.

    A's rows are read from a dense matrix, or, for a function, found by τ
    transposed products a step (`jax.linear_transpose`): an epoch then costs
    about n products. Once per epoch the true residual is computed (one
    product) and tested: |b - A x|₂ <= rtol |b|₂ ends the solve, and is what
    `converged` reports. Products counted: a dense epoch as one, plus the test.

    Attributes:
      block: τ, rows per step (at most n).
      rtol: relative residual tolerance (None: 1e-8 in float64).
      max_epochs: epochs at most.
      seed: the sampling's PRNG seed.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> K = jnp.array([[2.0, 0.0, 1.0], [0.0, 2.0, 1.0], [1.0, 1.0, 0.0]])  # KKT
      >>> solver = iterjax.linear.BlockKaczmarz(block=2, rtol=1e-6)
      >>> b = jnp.array([1.0, 0.0, 1.0])
      >>> x, stats = solver.solve_with_stats(K, b)
      >>> bool(stats.converged), bool(jnp.allclose(K @ x, b, atol=1e-5))
      (True, True)
    """

    transpose = "general"  # reverse mode: the same solver on Aᵀ

    def solve_with_stats(self, matvec, b, rtol=None):
        flat_b, unravel = tu.ravel(b)
        n = flat_b.shape[0]
        op = lambda v: tu.ravel(matvec(unravel(v)))[0]
        dense = isinstance(matvec, MatrixMatvec) and not isinstance(
            matvec.matrix, sparse.BCOO
        )
        if dense:
            A = matvec.matrix
            rows = lambda S: A[S]
        else:
            transpose = jax.linear_transpose(op, flat_b)
            eye = jnp.eye(n, dtype=flat_b.dtype)
            rows = lambda S: jax.vmap(lambda e: transpose(e)[0])(eye[S])
        tau = min(self.block, n)
        steps = math.ceil(n / tau)
        rtol = default_rtol(b, rtol, self.rtol)
        tol = rtol * jnp.linalg.norm(flat_b)

        def step(i, carry):
            x, order = carry
            S = jax.lax.dynamic_slice(order, (i * tau,), (tau,))
            A_S = rows(S)
            gram = A_S @ A_S.T
            y = jnp.linalg.pinv(gram, hermitian=True) @ (flat_b[S] - A_S @ x)
            return x + A_S.T @ y, order

        def epoch(state):
            x, _, k, key = state
            key, sub = jax.random.split(key)
            perm = jax.random.permutation(sub, n)
            order = jnp.concatenate([perm, perm[: steps * tau - n]])
            x, _ = jax.lax.fori_loop(0, steps, step, (x, order))
            return x, jnp.linalg.norm(flat_b - op(x)), k + 1, key

        def going(state):
            _, norm, k, _ = state
            return (norm > tol) & (k < self.max_epochs)

        start = (
            jnp.zeros_like(flat_b),
            jnp.linalg.norm(flat_b),
            jnp.int32(0),
            jax.random.key(self.seed),
        )
        x, norm, epochs, _ = jax.lax.while_loop(going, epoch, start)
        per_epoch = 2 if dense else n + 1
        stats = LinearStats(
            epochs * per_epoch, jnp.isfinite(norm) & (norm <= tol), ~jnp.isfinite(norm)
        )
        return nan_in_nan_out(b, unravel(x), stats)
