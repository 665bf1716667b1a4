"""Smoothed-aggregation algebraic multigrid (`SmoothedAggregation`) for sparse
symmetric positive-definite matrices: the hierarchy is set up on the host
(NumPy / SciPy), the cycle runs in JAX, so it jits and vmaps over right-hand
sides and stays a fixed linear map that implicit adjoints can use.

Setup, level by level, from A_0 = A (Vaněk, Mandel & Brezina 1996):

    strength:     j is a strong neighbour of i when |a_ij| >= θ √(|a_ii a_jj|)
    aggregation:  greedy, in three passes over the strength graph (a node with
                  no aggregated neighbour founds an aggregate of its
                  neighbourhood; the rest join a neighbouring aggregate, or
                  found their own)
    tentative:    T: piecewise-constant columns, one per aggregate, normalised
                  (T ᵀT = I; the constant vector is in range(T))
    smoothed:     P = (I - ω/ρ D⁻¹A) T,  ω = 4/3,  ρ = ρ(D⁻¹A)
    coarse:       A_{l+1} = Pᵀ A_l P   (Galerkin)

until a level has at most `max_coarse` unknowns, which are solved by a dense
pseudo-inverse. The cycle (V or W) smooths with a polynomial in D⁻¹A
(damped Jacobi, or Chebyshev on [ρ/5, 1.1 ρ], which needs no sequential
sweep), the same before and after the coarse correction, so that M ≈ A⁻¹ is
symmetric positive definite and CG can use it.

The matrices of the cycle are stored row-padded (ELL: each row's column
indices and values padded to the longest row), so that a product is one gather
and one row sum, with no scatter.
"""

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp
import scipy.sparse.linalg as spla

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from ._base import MatrixMatvec, _is_scipy_sparse
from .preconditioners import AbstractPreconditioner, chebyshev_direction

CHEBYSHEV_RATIO = 5.0  # the smoother targets [ρ / 5, 1.1 ρ] of D⁻¹A
PROLONGATION_OMEGA = 4.0 / 3.0


class Ell(struct.PyTreeNode):
    """A sparse matrix in row-padded (ELL) form: row i's entries are
    `values[i, :]` at columns `columns[i, :]` (padding: value 0, column 0)."""

    columns: jax.Array
    values: jax.Array

    @classmethod
    def from_scipy(cls, A, dtype):
        A = sp.csr_matrix(A)
        counts = np.diff(A.indptr)
        width = max(int(counts.max(initial=0)), 1)
        columns = np.zeros((A.shape[0], width), np.int32)
        values = np.zeros((A.shape[0], width), dtype)
        slot = np.arange(A.nnz) - np.repeat(A.indptr[:-1], counts)
        rows = np.repeat(np.arange(A.shape[0]), counts)
        columns[rows, slot] = A.indices
        values[rows, slot] = A.data
        return cls(jnp.asarray(columns), jnp.asarray(values))

    def __matmul__(self, x):
        return jnp.sum(self.values * x[self.columns], axis=-1)


class Level(struct.PyTreeNode):
    """One level of the hierarchy: its operator, inverse diagonal and ρ(D⁻¹A),
    and the prolongation P to it from the next coarser level (R = Pᵀ)."""

    A: Ell
    inverse_diagonal: jax.Array
    rho: float
    P: Ell
    R: Ell


def strength(A, theta):
    """The strong off-diagonal connections of A (symmetric measure), as a CSR
    pattern matrix."""
    A = sp.csr_matrix(A)
    coo = A.tocoo()
    d = np.abs(A.diagonal())
    off = coo.row != coo.col
    keep = off & (np.abs(coo.data) >= theta * np.sqrt(d[coo.row] * d[coo.col]))
    rows, cols = coo.row[keep], coo.col[keep]
    S = sp.csr_matrix((np.ones(rows.size), (rows, cols)), shape=A.shape)
    return S + S.T  # symmetric, as the measure is


def aggregate(S):
    """Greedy aggregation of the graph S (CSR pattern): the aggregate of each
    node, numbered from 0 (three passes, as in standard aggregation)."""
    n = S.shape[0]
    indptr, indices = S.indptr.tolist(), S.indices.tolist()
    owner = [-1] * n
    count = 0
    for i in range(n):  # 1: a free node with free neighbours founds one
        neighbours = indices[indptr[i] : indptr[i + 1]]
        if owner[i] == -1 and all(owner[j] == -1 for j in neighbours):
            for j in (i, *neighbours):
                owner[j] = count
            count += 1
    first = list(owner)
    for i in range(n):  # 2: join a neighbouring aggregate of the first pass
        if owner[i] == -1:
            for j in indices[indptr[i] : indptr[i + 1]]:
                if first[j] != -1:
                    owner[i] = first[j]
                    break
    for i in range(n):  # 3: what is left founds its own with its free neighbours
        if owner[i] == -1:
            owner[i] = count
            for j in indices[indptr[i] : indptr[i + 1]]:
                if owner[j] == -1:
                    owner[j] = count
            count += 1
    return np.asarray(owner), count


def tentative(owner, count, candidate):
    """T (n x count): the candidate vector restricted to each aggregate and
    normalised, and the coarse candidate (its norms), so that T c_coarse = c."""
    n = owner.size
    norms = np.sqrt(np.bincount(owner, candidate**2, minlength=count))
    values = candidate / np.where(norms > 0, norms, 1)[owner]
    T = sp.csr_matrix((values, (np.arange(n), owner)), shape=(n, count))
    return T, norms


def spectral_radius(A, inverse_diagonal):
    """ρ(D⁻¹A) for A symmetric positive (semi)definite: the largest eigenvalue
    of the symmetric D^{-1/2} A D^{-1/2} (Lanczos; dense when small)."""
    half = sp.diags(np.sqrt(inverse_diagonal))
    B = half @ A @ half
    if B.shape[0] <= 64:
        return float(np.linalg.eigvalsh(B.toarray())[-1])
    top = spla.eigsh(B, k=1, which="LA", tol=1e-3, return_eigenvectors=False)
    return float(top[0])


def setup(A, theta, max_coarse, max_levels):
    """The hierarchy of a scipy.sparse SPD matrix (module docstring), on the
    host: the matrices A_l (CSR, fine to coarse), the prolongators P_l and
    ρ(D⁻¹A_l) of every level but the coarsest."""
    A = sp.csr_matrix(A, dtype=np.float64)
    matrices, prolongators, rhos = [A], [], []
    candidate = np.ones(A.shape[0])
    while A.shape[0] > max_coarse and len(matrices) < max_levels:
        diagonal = A.diagonal()
        if np.any(diagonal <= 0):
            raise ValueError(
                "SmoothedAggregation: the matrix must have a positive diagonal "
                "(symmetric positive definite)"
            )
        inverse_diagonal = 1.0 / diagonal
        rho = spectral_radius(A, inverse_diagonal)
        owner, count = aggregate(strength(A, theta))
        if count >= A.shape[0]:  # no coarsening possible (no connections)
            break
        T, candidate = tentative(owner, count, candidate)
        smoother = sp.identity(A.shape[0]) - (PROLONGATION_OMEGA / rho) * (
            sp.diags(inverse_diagonal) @ A
        )
        P = sp.csr_matrix(smoother @ T)
        A = sp.csr_matrix(P.T @ A @ P)
        A = sp.csr_matrix((A + A.T) / 2)  # exactly symmetric
        matrices.append(A)
        prolongators.append(P)
        rhos.append(rho)
    return matrices, prolongators, rhos


class SmoothedAggregation(AbstractPreconditioner):
    """Smoothed-aggregation AMG as M ≈ A⁻¹ for a sparse symmetric
    positive-definite A (module docstring): the preconditioner of `CG`, or the
    cycle of `MultigridSolver`.

    The hierarchy needs A's entries, so it is set up on the host: by
    `setup(A)` (once, outside jit; the result is then used for any number of
    solves), or, without setup, from the operator the solver is given, when
    that is concrete (not traced): a dense or BCOO matrix, or an operator with
    `assemble()` (`iterjax.gallery.Poisson2D`). A set-up preconditioner is a
    pytree whose leaves are the hierarchy's arrays, so it can be passed to a
    jitted function as an argument (one compilation for every matrix of the
    same sparsity pattern, rather than its arrays as constants). The cycle
    treats b as a flat vector (a pytree is raveled).

    Products: `per_apply` counts one cycle's work in fine-matrix products, each
    level's products weighted by nnz(A_l) / nnz(A_0), P and Pᵀ by nnz(P) /
    nnz(A_0), rounded up. The setup is host work, not products (cost 0); time
    it apart.

    Attributes:
      theta: the strength threshold θ in [0, 1) (0: every connection is
        strong, pyamg's default).
      smoother: "chebyshev" (a polynomial of degree `degree` - 1 in D⁻¹A) or
        "jacobi" (`degree` sweeps, ω = 4 / (3ρ)).
      degree: products per smoothing (>= 1), before and after.
      cycle: "V" or "W".
      max_coarse: the largest level solved directly.
      max_levels: the most levels.
      levels, coarse_inverse, sizes, operator_complexity, work: set by `setup`
        (the levels' arrays, the coarsest level's pseudo-inverse, the levels'
        sizes, Σ nnz(A_l) / nnz(A_0), and the products of one cycle).

    Example:
      >>> import jax.numpy as jnp, scipy.sparse as sp, iterjax
      >>> n = 400
      >>> A = sp.diags([-1.0, 2.0, -1.0], [-1, 0, 1], shape=(n, n)).tocsr()
      >>> amg = iterjax.linear.SmoothedAggregation().setup(A)
      >>> cg = iterjax.CG(preconditioner=amg, rtol=1e-6)
      >>> x, stats = cg.solve_with_stats(iterjax.linear.from_scipy(A), jnp.ones(n))
      >>> bool(stats.converged), amg.sizes[:3]
      (True, (400, 134, 45))
    """

    theta: float = struct.field(pytree_node=False, default=0.0)
    smoother: Literal["chebyshev", "jacobi"] = struct.field(
        pytree_node=False, default="chebyshev"
    )
    degree: int = struct.field(pytree_node=False, default=2)
    cycle: Literal["V", "W"] = struct.field(pytree_node=False, default="V")
    max_coarse: int = struct.field(pytree_node=False, default=10)
    max_levels: int = struct.field(pytree_node=False, default=10)
    levels: tuple[Level, ...] | None = None
    coarse_inverse: jax.Array | None = None
    sizes: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)
    operator_complexity: float | None = struct.field(pytree_node=False, default=None)
    work: int | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        name = "SmoothedAggregation"
        check_range(name, "theta", self.theta, 0.0, 1.0, hi_open=True)
        if self.smoother not in ("chebyshev", "jacobi"):
            raise ValueError(
                f"{name}: `smoother` must be 'chebyshev' or 'jacobi', got "
                f"{self.smoother!r}"
            )
        if self.cycle not in ("V", "W"):
            raise ValueError(f"{name}: `cycle` must be 'V' or 'W', got {self.cycle!r}")
        check_int(name, "degree", self.degree, 1)
        check_int(name, "max_coarse", self.max_coarse, 1)
        check_int(name, "max_levels", self.max_levels, 1)

    # A solver holds its preconditioner as static (hashed by jit): a set-up
    # one is compared by the identity of its arrays, not their values.
    def _key(self):
        arrays = jax.tree.leaves((self.levels, self.coarse_inverse))
        static = (self.theta, self.smoother, self.degree, self.cycle)
        return (*static, self.max_coarse, self.max_levels, *map(id, arrays))

    def __eq__(self, other):
        return type(other) is type(self) and self._key() == other._key()

    def __hash__(self):
        return hash(self._key())

    def setup(self, A, dtype=None):
        """This preconditioner with the hierarchy of A (a scipy.sparse, dense
        NumPy or concrete JAX matrix, or an operator with `assemble()`), set
        up on the host; its arrays in `dtype` (None: JAX's default float)."""
        matrix = _host_matrix(A)
        if matrix is None:
            raise TypeError(
                "SmoothedAggregation.setup: `A` must be a scipy.sparse matrix, a "
                "dense or BCOO matrix with concrete values, or an operator with "
                f"assemble(), got {type(A).__name__}"
            )
        if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
            raise ValueError(
                "SmoothedAggregation.setup: `A` must be square, got shape "
                f"{matrix.shape}"
            )
        dtype = jnp.zeros((), dtype).dtype  # None: float32 or float64 (x64)
        matrices, prolongators, rhos = setup(
            matrix, self.theta, self.max_coarse, self.max_levels
        )
        levels = tuple(
            Level(
                Ell.from_scipy(A, dtype),
                jnp.asarray(1.0 / A.diagonal(), dtype),
                rho,
                Ell.from_scipy(P, dtype),
                Ell.from_scipy(P.T, dtype),
            )
            for A, P, rho in zip(matrices, prolongators, rhos, strict=False)
        )
        coarse = np.linalg.pinv(matrices[-1].toarray(), hermitian=True)
        return self.replace(
            levels=levels,
            coarse_inverse=jnp.asarray(coarse, dtype),
            sizes=tuple(M.shape[0] for M in matrices),
            operator_complexity=sum(M.nnz for M in matrices) / matrices[0].nnz,
            work=self._work(matrices, prolongators),
        )

    def prepared(self, matvec):
        """Set up from the operator when not yet set up and the operator's
        entries are concrete (class docstring); else itself."""
        if self.levels is not None:
            return self
        matrix = _host_matrix(matvec)  # (assembled once: setup takes it as is)
        return self if matrix is None else self.setup(matrix, _dtype(matvec))

    def build(self, matvec, b):
        if self.levels is None:
            raise ValueError(
                "SmoothedAggregation: its hierarchy needs the matrix's entries; "
                "call .setup(A) on the host first (the operator here is a "
                "function, or a matrix traced under jit)"
            )
        flat, unravel = tu.ravel(b)
        if flat.shape[0] != self.sizes[0]:
            raise ValueError(
                f"SmoothedAggregation: set up for {self.sizes[0]} unknowns, b has "
                f"{flat.shape[0]}"
            )
        levels = self.levels
        cast = lambda v: v.astype(flat.dtype)

        def cycle(depth, r):
            if depth == len(levels):
                return cast(self.coarse_inverse @ r)
            level = levels[depth]
            x = cast(self._smooth(level, None, r))
            rc = cast(level.R @ (r - level.A @ x))
            xc = cycle(depth + 1, rc)
            if self.cycle == "W" and depth + 1 < len(levels):
                xc = xc + cycle(depth + 1, cast(rc - levels[depth + 1].A @ xc))
            x = x + cast(level.P @ xc)
            return cast(self._smooth(level, x, r))

        # one program, not op-by-op dispatch of every level when called eagerly
        apply = jax.jit(lambda r: unravel(cycle(0, tu.ravel(r)[0])))
        return apply, 0, self.work

    def _smooth(self, level, x, r):
        """`degree` steps of the smoother from x (None: from 0, whose residual
        r is free): p(D⁻¹A) D⁻¹ (r - A x) added to x, the same polynomial p of
        degree `degree` - 1 before and after, so that the cycle is symmetric."""
        A, dinv, rho = level.A, level.inverse_diagonal, level.rho
        res = dinv * (r if x is None else r - A @ x)
        if self.smoother == "jacobi":
            omega = 4.0 / (3.0 * rho)
            x = omega * res if x is None else x + omega * res
            for _ in range(self.degree - 1):
                x = x + omega * dinv * (r - A @ x)
            return x
        hi, lo = 1.1 * rho, rho / CHEBYSHEV_RATIO
        theta, delta = (hi + lo) / 2, (hi - lo) / 2
        d, c = res / theta, delta / theta
        x = d if x is None else x + d
        for _ in range(self.degree - 1):
            res = res - dinv * (A @ d)
            d, c = chebyshev_direction(d, res, c, theta, delta)
            x = x + d
        return x

    def _work(self, matrices, prolongators):
        """One cycle's products in fine-matrix products (class docstring)."""
        nnz0 = matrices[0].nnz
        visits, work = 1, 0.0
        for depth, (A, P) in enumerate(zip(matrices, prolongators, strict=False)):
            # pre (its first residual free), the residual, post; R and P
            work += visits * (2 * self.degree * A.nnz + 2 * P.nnz) / nnz0
            if self.cycle == "W" and depth + 1 < len(prolongators):
                work += visits * matrices[depth + 1].nnz / nnz0
                visits *= 2
        return math.ceil(work)


def _host_matrix(A):
    """A as a scipy CSR matrix when its entries are concrete, else None."""
    if _is_scipy_sparse(A):
        return sp.csr_matrix(A)
    if isinstance(A, MatrixMatvec):
        A = A.matrix
    if callable(getattr(A, "assemble", None)):
        try:  # (its arithmetic on concrete entries runs now, even under jit)
            with jax.ensure_compile_time_eval():
                return A.assemble()
        except (
            jax.errors.ConcretizationTypeError,
            jax.errors.TracerArrayConversionError,
        ):
            return None
    if isinstance(A, jax.experimental.sparse.BCOO):
        if isinstance(A.data, jax.core.Tracer):
            return None
        indices = np.asarray(A.indices)
        rows, cols = indices[:, 0], indices[:, 1]
        return sp.csr_matrix((np.asarray(A.data), (rows, cols)), shape=A.shape)
    if isinstance(A, np.ndarray | jax.Array) and not isinstance(A, jax.core.Tracer):
        return sp.csr_matrix(np.asarray(A))
    return None


def _dtype(A):
    """The float dtype of a concrete operator's entries."""
    A = A.matrix if isinstance(A, MatrixMatvec) else A
    dtypes = [jnp.result_type(a) for a in jax.tree.leaves(A)]
    floats = [d for d in dtypes if jnp.issubdtype(d, jnp.floating)]
    return floats[0] if floats else None
