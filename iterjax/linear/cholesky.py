"""Incomplete Cholesky on a grid: M = L Lᵀ with L lower triangular on the
(2d + 1)-point star of an n^d grid, and its triangular solves by wavefronts.

In row-major order a node i couples, below the diagonal, to its d neighbours
i - e_a (a = 0, ..., d - 1), so L is held as a positive diagonal δ and d
coefficient fields λ_a = L[i, i - e_a] (`GridFactor`). A forward solve L y = r,

    y[i] = (r[i] - Σ_a λ_a[i] y[i - e_a]) / δ[i],

needs y on the hyperplane Σ_k i_k = s - 1 only to produce it on s: the solve
is a scan over the d (n - 1) + 1 hyperplanes (wavefronts), each one vector
operation over its nodes, O(n^d) work at depth O(d n). Lᵀ z = y is the same
recursion with every axis reversed (λ_a read at i + e_a).

IC(0) (`incomplete_cholesky`, Meijerink & van der Vorst 1977) keeps A's
pattern: with A[i, i] = c[i] and A[i, i - e_a] = α_a[i] (symmetric),

    δ[i]² = c[i] - Σ_a α_a[i]² / δ[i - e_a]²,      λ_a[i] = α_a[i] / δ[i - e_a],

the same wavefront recursion on the pivots δ². L Lᵀ equals A on the star and
differs from it by the dropped fill-in A[i, i - e_a + e_b]; for an M-matrix
(a Poisson or Darcy operator) every pivot is positive (Meijerink & van der
Vorst), so M is symmetric positive definite and CG may use it. A non-positive
pivot (IC(0) of an indefinite or non-M matrix can break down) makes M's
application NaN, which CG reports as not converged.
"""

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .multigrid import Stencil
from .preconditioners import AbstractPreconditioner


class GridFactor(struct.PyTreeNode):
    """A lower-triangular L on the star of an n^d grid (row-major order), and
    M = L Lᵀ: `__call__` applies M, `solve` applies M⁻¹ = L⁻ᵀ L⁻¹ (two wavefront
    scans, no operator product). M is symmetric positive definite whenever δ > 0.

    Attributes:
      diag: δ, (n,)^d, positive.
      lower: (d,) + (n,)^d, lower[a][i] = L[i, i - e_a] (read as zero where
        i - e_a is off the grid).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> from iterjax.linear import cholesky
      >>> A, r = iterjax.gallery.Poisson2D(jnp.ones((4, 4))), jnp.ones((4, 4))
      >>> L = cholesky.incomplete_cholesky(*cholesky.star(A, 4, r.dtype, 2))
      >>> bool(jnp.allclose(L(L.solve(r)), r)), bool((L.diag > 0).all())
      (True, True)
    """

    diag: jax.Array
    lower: jax.Array

    def __post_init__(self):
        shape = getattr(self.diag, "shape", None)
        if shape is None:
            return
        if len(set(shape)) > 1:
            raise ValueError(f"GridFactor: `diag` must be an n^d grid, got {shape}")
        if tuple(self.lower.shape) != (len(shape), *shape):
            raise ValueError(
                f"GridFactor: `lower` must have shape {(len(shape), *shape)} (one "
                f"field per axis), got {tuple(self.lower.shape)}"
            )

    def lower_matvec(self, u):
        """L u."""
        lower = _inside(self.lower)
        return self.diag * u + sum(lower[a] * _behind(u, a) for a in range(u.ndim))

    def upper_matvec(self, u):
        """Lᵀ u."""
        lower = _inside(self.lower)
        return self.diag * u + sum(_ahead(lower[a] * u, a) for a in range(u.ndim))

    def __call__(self, u):
        return self.lower_matvec(self.upper_matvec(u))

    def solve(self, r):
        """M⁻¹ r = L⁻ᵀ (L⁻¹ r)."""
        y = _lower_solve(self.diag, _inside(self.lower), r)
        flip = lambda x: jnp.flip(x, range(x.ndim))
        upper = jnp.stack(  # Lᵀ reversed is lower: λ_a read at i + e_a
            [flip(_ahead(lam, a)) for a, lam in enumerate(_inside(self.lower))]
        )
        return flip(_lower_solve(flip(self.diag), upper, flip(y)))


@jax.jit
def incomplete_cholesky(centre, couplings):
    """IC(0) of a symmetric star operator (module docstring): `centre` c, (n,)^d,
    and `couplings` α, (d,) + (n,)^d, α[a][i] = A[i, i - e_a]."""
    couplings = _inside(couplings)

    def pivot(behind, c, *alpha):  # δ² on a hyperplane from δ² on the last one
        terms = (a * a / jnp.where(a == 0, 1, p) for a, p in zip(alpha, behind))
        return c - sum(terms)

    square = _wavefront(pivot, [centre, *couplings], fills=[1, *[0] * len(couplings)])
    diag = jnp.sqrt(square)
    lower = jnp.stack(
        [
            alpha / jnp.where(alpha == 0, 1, _behind(diag, a))
            for a, alpha in enumerate(couplings)
        ]
    )
    return GridFactor(diag, lower)


class IncompleteCholesky(AbstractPreconditioner):
    """M = (L Lᵀ)⁻¹ with L the IC(0) factor of a symmetric grid operator on its
    (2d + 1)-point star (module docstring): the operator's stencil is probed
    (3^d products, `Stencil.probe`; entries outside the star, as in a Galerkin
    9-point level, are dropped), factored once per solve, and each application
    is two triangular solves by wavefronts (no operator product, depth O(d n)).
    For operators on (n,)^d grids, d = 1, 2, 3.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A = iterjax.gallery.Poisson2D(jnp.ones((15, 15)))
      >>> ic = iterjax.CG(rtol=1e-5, preconditioner=iterjax.linear.IncompleteCholesky())
      >>> x, stats = ic.solve_with_stats(A, jnp.ones((15, 15)))
      >>> int(stats.num_matvecs) - 9  # steps (9 products: the probe; plain CG: 22)
      12
    """

    def build(self, matvec, b):
        if not hasattr(b, "ndim") or b.ndim not in (1, 2, 3) or len(set(b.shape)) > 1:
            raise ValueError(
                "IncompleteCholesky: the right-hand side must be an n^d grid "
                f"array, d = 1, 2, 3, got {getattr(b, 'shape', type(b))}"
            )
        factor = incomplete_cholesky(*star(matvec, b.shape[0], b.dtype, b.ndim))
        return factor.solve, 3**b.ndim, 0


def star(matvec, n, dtype, ndim):
    """(c, α): the centre and the couplings to i - e_a of a linear grid operator
    whose stencil lies within 3^d, probed (`Stencil.probe`, 3^d products)."""
    w = Stencil.probe(matvec, n, dtype, ndim).w
    centre = w[(..., *(1,) * ndim)]
    behind = lambda a: tuple(0 if k == a else 1 for k in range(ndim))
    return centre, jnp.stack([w[(..., *behind(a))] for a in range(ndim)])


def unit_diagonal(centre, couplings):
    """ρ, the couplings of D^{-1/2} A D^{-1/2} (D = diag(A) = c): ρ[a][i] =
    α[a][i] / sqrt(c[i] c[i - e_a]), dimensionless (zero off the grid): a
    scale-free description of a star operator, e.g. a learned factor's input."""
    couplings = _inside(couplings)
    return jnp.stack(
        [
            alpha / jnp.sqrt(centre * jnp.where(alpha == 0, 1, _behind(centre, a)))
            for a, alpha in enumerate(couplings)
        ]
    )


def _behind(u, axis):
    """u[i - e_axis], zero where that is off the grid."""
    n = u.shape[axis]
    pad = [(0, 0)] * u.ndim
    pad[axis] = (1, 0)
    return jax.lax.slice_in_dim(jnp.pad(u, pad), 0, n, axis=axis)


def _ahead(u, axis):
    """u[i + e_axis], zero where that is off the grid."""
    n = u.shape[axis]
    pad = [(0, 0)] * u.ndim
    pad[axis] = (0, 1)
    return jax.lax.slice_in_dim(jnp.pad(u, pad), 1, n + 1, axis=axis)


def _inside(lower):
    """`lower` with lower[a] zeroed where i - e_a is off the grid (i_a = 0)."""
    d = lower.shape[0]
    first = lambda a: jnp.arange(lower.shape[1 + a]).reshape(
        [-1 if k == a else 1 for k in range(d)]
    )
    return jnp.stack([jnp.where(first(a) > 0, lower[a], 0) for a in range(d)])


@jax.jit
def _lower_solve(diag, lower, r):
    """y with L y = r (module docstring), by wavefronts."""

    def forward(behind, delta, rhs, *lam):
        return (rhs - sum(c * y for c, y in zip(lam, behind))) / delta

    return _wavefront(forward, [diag, r, *lower], fills=[1, 0, *[0] * len(lower)])


def _wavefront(step, fields, fills):
    """Values v on an n^d grid from v[i] = step([v[i - e_a] for a], *fields[i]),
    scanned over the hyperplanes Σ_k i_k = s. A hyperplane is indexed by its
    first d - 1 indices (the last is s minus their sum); slots off the grid
    hold `fills`, and a neighbour off the grid reads as the value computed in
    its slot (0 for an axis < d - 1)."""
    n, d = fields[0].shape[0], fields[0].ndim
    s = jnp.arange(d * (n - 1) + 1).reshape((-1,) + (1,) * (d - 1))
    head = jnp.indices((n,) * (d - 1))  # (d - 1, n, ..., n)
    last = s - jnp.sum(head, axis=0)[None]
    inside = (last >= 0) & (last < n)
    at = (*(jnp.broadcast_to(h, last.shape) for h in head), jnp.clip(last, 0, n - 1))
    skewed = [jnp.where(inside, f[at], fill) for f, fill in zip(fields, fills)]

    def scan_step(carry, xs):
        behind = [_behind(carry, a) for a in range(d - 1)] + [carry]
        value = step(behind, *xs)
        return value, value

    init = jnp.zeros((n,) * (d - 1), jnp.result_type(*fields))
    _, values = jax.lax.scan(scan_step, init, skewed)
    return values[(sum(jnp.indices((n,) * d)), *jnp.indices((n,) * d)[:-1])]
