"""Linear solvers: `solver.solve(A, b) -> x` with `A x = b`.

`A` is a linear function on pytrees (`matvec(x) = A x`, matrix-free), or a square
matrix: a dense 2-D array or a `jax.experimental.sparse.BCOO` (`from_scipy`
turns a scipy.sparse matrix into one); `b` is a pytree like A's input. Every
solver can be used as the `solve` and `transpose_solve` of
`jax.lax.custom_linear_solve`, which is how the implicit adjoint uses them.
"""

import abc
import functools
from typing import ClassVar, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import sparse

from .. import _tree as tu
from .._module import Module
from .._types import Array, Bool, Int


class LinearStats(NamedTuple):
    """What a linear solve cost and whether it succeeded."""

    num_matvecs: Int[Array, ""]  # -1 where the solver does not report it
    converged: Bool[Array, ""]  # the residual reached the tolerance
    breakdown: Bool[Array, ""]  # the method failed (CG: A not positive definite)


class MatrixMatvec:
    """x -> A x for a dense or BCOO matrix A, which stays readable (`matrix`,
    `diagonal()`) for what needs more than products: the Jacobi preconditioner
    reads the diagonal instead of probing for it."""

    def __init__(self, matrix):
        self.matrix = matrix

    def __call__(self, x):
        return self.matrix @ x

    def diagonal(self):
        A = self.matrix
        if isinstance(A, sparse.BCOO):
            rows, cols = A.indices[..., 0], A.indices[..., 1]
            on = jnp.where(rows == cols, A.data, 0)
            return jnp.zeros(A.shape[-1], A.dtype).at[rows].add(on)
        return jnp.diagonal(A)


def _is_scipy_sparse(A):
    """A scipy.sparse matrix or array, told apart without importing scipy."""
    return hasattr(A, "tocoo") and hasattr(A, "nnz")


def as_matvec(A):
    """The function x -> A x of a linear operator given as a function (returned
    as it is), a square dense 2-D array or a square BCOO matrix.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> matvec = iterjax.linear.as_matvec(jnp.eye(2) * 3.0)
      >>> [float(v) for v in matvec(jnp.ones(2))]
      [3.0, 3.0]
    """
    if isinstance(A, sparse.BCOO | jax.Array | np.ndarray):
        shape = A.shape[-2:] if A.ndim >= 2 else A.shape
        if A.ndim < 2 or shape[0] != shape[1]:
            raise ValueError(
                f"`matvec`: a matrix must be square (n, n), got shape {A.shape}"
            )
        return MatrixMatvec(A)
    if _is_scipy_sparse(A):  # host memory
        raise TypeError(
            "`matvec`: a scipy.sparse matrix cannot be traced; convert it with "
            "iterjax.linear.from_scipy(A)"
        )
    if not callable(A):
        raise TypeError(
            "`matvec` must be a function x -> A x, a square 2-D array or a BCOO "
            f"matrix, got {type(A).__name__}"
        )
    return A


def from_scipy(A, dtype=None) -> sparse.BCOO:
    """A scipy.sparse matrix as a `BCOO` matrix that every solver takes (and
    that jits, vmaps and differentiates with respect to its values).

    Example:
      >>> import jax.numpy as jnp, scipy.sparse as sp, iterjax
      >>> A = iterjax.linear.from_scipy(sp.diags([2.0, 3.0, 4.0]).tocsr())  # BCOO
      >>> x, stats = iterjax.CG().solve_with_stats(A, jnp.ones(3))
      >>> bool(stats.converged), [round(float(v), 4) for v in x]
      (True, [0.5, 0.3333, 0.25])
    """
    if not _is_scipy_sparse(A):
        raise TypeError(f"`A` must be a scipy.sparse matrix, got {type(A).__name__}")
    coo = A.tocoo()
    rows, cols = np.asarray(coo.row), np.asarray(coo.col)
    data = jnp.asarray(coo.data, dtype)
    indices = jnp.asarray(np.stack([rows, cols], axis=1), jnp.int32)
    return sparse.BCOO((data, indices), shape=A.shape)


def _taking_matrices(method):
    """`method(self, A, ...)` with A a function, a dense or a BCOO matrix."""

    @functools.wraps(method)
    def wrapped(self, matvec, *args, **kwargs):
        matvec = as_matvec(matvec)
        return method(self.prepared(matvec), matvec, *args, **kwargs)

    return wrapped


def _implicitly_differentiated(method, transpose):
    """`solve_with_stats` inside `jax.lax.custom_linear_solve`: reverse mode
    solves the transposed system (the same solve when A is symmetric) instead of
    differentiating the loop, which a while loop cannot be."""

    @functools.wraps(method)
    def wrapped(self, matvec, b, rtol=None):
        solve = lambda mv, rhs: method(self, mv, rhs, rtol)
        return jax.lax.custom_linear_solve(
            matvec,
            b,
            solve,
            transpose_solve=None if transpose == "symmetric" else solve,
            symmetric=transpose == "symmetric",
            has_aux=True,
        )

    return wrapped


class AbstractLinearSolver(Module):
    """Base class of the linear solvers (floats are leaves, ints static).

    `converged` is never "finite": it means the residual |b - A x| reached the
    solver's tolerance. A right-hand side that is not finite gives x = NaN and
    `converged` False (`nan_in_nan_out`), never the loop's start x = 0.

    Every solver's `solve` / `solve_with_stats` takes A as a function, a dense or
    a BCOO matrix (`as_matvec`, applied to each subclass's own methods). A
    solver whose loop reverse mode cannot go through declares `transpose`:
    "symmetric" (A = Aᵀ assumed, as CG does: the same solve) or "general" (the
    same solver on Aᵀ), and its `solve_with_stats` runs inside
    `jax.lax.custom_linear_solve`, so that `jax.grad` of anything computed from
    its solution (with respect to A's values or to b) is one more solve.
    """

    transpose: ClassVar[Literal["symmetric", "general"] | None] = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        method = cls.__dict__.get("solve_with_stats")
        if method is not None:
            if "solve_loop" not in cls.__dict__:
                cls.solve_loop = _taking_matrices(method)
            if cls.transpose is not None:
                method = _implicitly_differentiated(method, cls.transpose)
            cls.solve_with_stats = _taking_matrices(method)
        if "solve" in cls.__dict__:
            cls.solve = _taking_matrices(cls.__dict__["solve"])

    def prepared(self, matvec):
        """This solver with the host-side setup its parts need done from the
        operator, while it is concrete (before any tracing of the solve):
        a preconditioner's hierarchy (`SmoothedAggregation`). Itself by
        default; every solve calls it."""
        return self

    def solve_loop(self, matvec, b, rtol=None):
        """`solve_with_stats` without its own `custom_linear_solve`: for a caller
        that is itself the `solve` of one (the implicit adjoint, the
        hypergradient), where a second one adds nothing, and where JAX (0.10)
        batches the inner one's stats wrongly under `jax.hessian` when the
        caller masks x by them."""
        return self.solve_with_stats(matvec, b, rtol)

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


def checked_answer(matvec, b, x, tol, num_matvecs):
    """`(x, LinearStats)` for a solver whose loop does not report its residual:
    `converged` is |b - A x|₂ <= tol recomputed (`residual_within`, one product,
    to count in `num_matvecs`), `breakdown` a non-finite x, and NaN in gives
    NaN out (`nan_in_nan_out`)."""
    ok = residual_within(matvec, b, x, tol)
    stats = LinearStats(jnp.asarray(num_matvecs, jnp.int32), ok, ~tu.all_finite(x))
    return nan_in_nan_out(b, x, stats)


def residual_within(matvec, b, x, tol):
    """|b - A x|₂ <= tol, recomputed (one product): the test of a solver whose
    loop does not report it. A tolerance below the rounding error of computing
    b - A x itself (16 ε (|A x| + |b|), float32's floor) cannot be checked, so
    that floor stands in for it. A residual that is not finite (A x
    overflowed) never passes."""
    ax = matvec(x)
    eps = max(float(jnp.finfo(jnp.result_type(a)).eps) for a in jax.tree.leaves(b))
    floor = 16 * eps * (tu.two_norm(ax) + tu.two_norm(b))
    residual = tu.two_norm(tu.tree_sub(b, ax))
    # an overflowed product makes the floor infinite: never a pass
    return jnp.isfinite(residual) & (residual <= jnp.maximum(tol, floor))
