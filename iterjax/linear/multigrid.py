"""Geometric multigrid for structured grids: V- and W-cycles as a preconditioner
(`Multigrid`) and as a solver (`MultigridSolver`).

On the grid of an n x n (or n x n x n) operator with n = 2m + 1, the coarse grid
holds the nodes of odd index (spacing 2h). One cycle for A x = r, from x = 0:

    x <- S^ν₁(x; r)                      pre-smoothing
    x <- x + P C(R (r - A x))            coarse correction (C: one cycle at 2h,
                                         two for a W-cycle; exact at the bottom)
    x <- S*^ν₂(x; r)                     post-smoothing, the adjoint sweeps

R is full weighting (the stencil [1 2 1]ᵀ[1 2 1] / 16; in 3-D its product with
[1 2 1] / 4), P = 2^d Rᵀ bilinear (trilinear) interpolation, and the coarse
operator is the problem rediscretised at 2h (`operator.coarsen()`) or the
Galerkin product A_2h = R A_h P, a 9-point (27-point in 3-D) stencil found by
probing (`Stencil.galerkin`), which needs no coarse discretisation and follows
rough coefficients that sampling at 2h misses. With red-black Gauss-Seidel
forward before and backward after (2^d colours on Galerkin levels; or damped
Jacobi both ways) the cycle is a symmetric
positive-definite M ≈ A⁻¹, so CG can use it; its convergence rate is bounded away from 1
independently of h, hence CG + multigrid needs iterations flat in the grid size
(Trottenberg, Oosterlee & Schüller, *Multigrid*, 2001, ch. 2).
"""

import functools
import itertools
import math
from typing import Literal

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._checks import check_int, check_range
from ._base import AbstractLinearSolver, LinearStats, nan_in_nan_out
from .krylov import default_rtol
from .preconditioners import AbstractPreconditioner


def restrict(r):
    """Full weighting of a grid function of side n = 2m + 1 in each of its
    dimensions (1, 2 or 3) onto side m: the stencil [1 2 1] / 4 along each axis
    in turn (separable: 3 d terms, not 3^d)."""
    m = (r.shape[-1] - 1) // 2
    for axis in range(r.ndim):  # coarse node I from fine nodes 2I, 2I + 1, 2I + 2
        at = lambda a: jax.lax.slice_in_dim(r, a, a + 2 * m - 1, 2, axis)
        r = 0.25 * at(0) + 0.5 * at(1) + 0.25 * at(2)
    return r


def prolong(uc, n):
    """Multilinear (bilinear in 2-D) interpolation of a grid function of side m
    onto side n = 2m + 1, [1 2 1] / 2 along each axis in turn: 2^d Rᵀ, so that
    the cycle is symmetric."""
    u = uc
    zero = jnp.zeros((), uc.dtype)
    for axis in range(uc.ndim):
        # coarse node I at 2I + 2 of a line of n + 2: zeros between, two beyond
        config = [(0, 0, 0)] * u.ndim
        config[axis] = (2, 2, 1)
        z = jax.lax.pad(u, zero, config)
        at = lambda a: jax.lax.slice_in_dim(z, a, a + n, 1, axis)
        u = 0.5 * at(0) + at(1) + 0.5 * at(2)
    return u


class Stencil(struct.PyTreeNode):
    """A 3^d-point operator on an n^d grid (d = 2: 9 points, d = 3: 27) with zero
    boundary values: (A u)[i] = Σ_{a ∈ {-1, 0, 1}^d} w[i, a + 1] u[i + a].

    Multigrid's Galerkin levels are of this type. `sweep` is Gauss-Seidel in 2^d
    colours (the parity of each index): nodes of one colour do not touch in a
    3^d-point stencil, so each colour updates at once (backward: the colours
    reversed). `Stencil9` is its 2-D name.

    Attributes:
      w: (n,)^d + (3,)^d stencil weights.
    """

    w: jax.Array

    @classmethod
    def probe(cls, fn, n, dtype, ndim=2):
        """The stencil of a linear `fn` on n^ndim grids whose stencil lies
        within 3^ndim, from 3^ndim products: with colours (i_k mod 3)_k, each
        node sees one node of each colour in its 3^ndim neighbourhood."""
        masks = jnp.stack(_colour_classes(n, ndim, 3)).astype(dtype)
        outs = jax.vmap(fn)(masks)  # (3^ndim, n, ..., n)
        # the colour of node i + a - 1, numbered as `_colour_classes` orders them
        idx = tuple(jnp.indices((n,) * ndim))
        colour_of = lambda a: sum(
            3 ** (ndim - 1 - k) * ((i + a[k] - 1) % 3) for k, i in enumerate(idx)
        )
        offsets = itertools.product(range(3), repeat=ndim)
        w = [outs[(colour_of(a), *idx)] for a in offsets]
        return cls(jnp.stack(w, axis=-1).reshape((n,) * ndim + (3,) * ndim))

    @classmethod
    def galerkin(cls, operator, n, transfer=None):
        """R A P on the coarse grid of an n^d operator, n = 2m + 1 (R, P: full
        weighting and multilinear interpolation, or `transfer` = (R, P))."""
        m = (n - 1) // 2
        R, P = transfer or _multilinear(n)
        coarse = lambda uc: R(operator(P(uc)))
        return cls.probe(coarse, m, _dtype(operator), _ndim(operator))

    @property
    def ndim(self):
        return self.w.ndim // 2

    def __call__(self, u):
        return self._at(u, (0,) * self.ndim, 1)

    def _at(self, u, first, step):
        """(A u) at the nodes first + step j (each axis), from the padded grid."""
        n = u.shape[0]
        up = jnp.pad(u, 1)
        nodes = tuple(slice(f, None, step) for f in first)
        return sum(
            self.w[(*nodes, *a)]
            * up[tuple(slice(f + b, n + b, step) for f, b in zip(first, a))]
            for a in itertools.product(range(3), repeat=self.ndim)
        )

    points = property(lambda self: 3**self.ndim)  # stencil points per node
    sweep_products = 1  # a sweep evaluates the stencil once at every node

    def diagonal(self):
        return self.w[(..., *(1,) * self.ndim)]

    def coarsen(self):
        return Stencil.galerkin(self, self.w.shape[0])

    def sweep(self, u, b, omega, backward=False):
        """One SOR sweep in 2^d-colour order, each colour (a parity per index)
        evaluated at its own nodes only: one stencil product a sweep."""
        colours = list(itertools.product(range(2), repeat=self.ndim))
        d, n = self.diagonal(), u.shape[0]
        for first in reversed(colours) if backward else colours:
            nodes = tuple(slice(f, None, 2) for f in first)
            step = omega * (b[nodes] - self._at(u, first, 2)) / d[nodes]
            # back onto the grid: the colour's nodes, zeros between (interior pad)
            config = [(f, n - f - 2 * s + 1, 1) for f, s in zip(first, step.shape)]
            u = u + jax.lax.pad(step, jnp.zeros((), u.dtype), config)
        return u


Stencil9 = Stencil  # the 2-D (9-point) name


def _multilinear(n):
    """(R, P) between side n = 2m + 1 and side m: full weighting and
    multilinear interpolation."""
    return restrict, functools.partial(prolong, n=n)


def operator_transfer(stencil):
    """Operator-dependent interpolation P and restriction R = Pᵀ / 2^d on a grid
    of side n = 2m + 1 in d = 2 or 3 dimensions (Alcouffe, Brandt, Dendy &
    Painter 1981; in 3-D as in Dendy's black-box multigrid), from the fine
    operator's 3^d-point `Stencil` w (coarse nodes at odd indices).

    A fine node's class is the set F of axes along which its index is even
    (between coarse nodes): F = ∅ is a coarse node, u = u_c. For |F| = 1, 2,
    ..., d in turn, a node of class F solves its own equation with the stencil
    collapsed (summed) over the other axes, w_F, from its neighbours within F,
    which belong to smaller classes and are already known:

        u = -Σ_{o ∈ {-1, 0, 1}^F, o ≠ 0} w_F[o] u_{i+o} / w_F[0]

    In 2-D: a node between two coarse nodes along axis 0 uses the stencil
    collapsed along axis 1, and a coarse cell's centre its full 9-point
    equation; in 3-D, edges, then faces (9-point collapsed stencils), then
    cell centres (27 points). On a constant-coefficient Laplacian this is
    multilinear interpolation; where k jumps it follows the flux (u
    interpolated across an interface weighs the side of larger k), which
    multilinear interpolation does not. Each class is evaluated at its own
    nodes only: P costs `transfer_terms(n, d)` multiply-adds a fine node, and
    so does R. Returns (R, P)."""
    w = stencil.w
    n, d = w.shape[0], stencil.ndim
    m = (n - 1) // 2
    classes = [
        F for size in range(1, d + 1) for F in itertools.combinations(range(d), size)
    ]

    # a grid function is held as 2^d parity blocks, block[p] the nodes whose
    # index along axis a has parity p[a] (1: odd, coarse-like): class F is the
    # block even along F, odd elsewhere; its neighbours are contiguous slices
    parity = lambda F: tuple(0 if a in F else 1 for a in range(d))
    weights = {}
    for F in classes:  # the class's nodes first, then the collapse
        at = tuple(slice(0 if a in F else 1, n, 2) for a in range(d))
        others = tuple(d + a for a in range(d) if a not in F)
        collapsed = w[at].sum(others)
        centre = collapsed[(...,) + (1,) * len(F)]
        weights[F] = -collapsed / centre[(...,) + (None,) * len(F)]

    def neighbour(blocks, F, o):
        """The values at F's nodes moved by o along F (zero off the grid)."""
        p, block = list(parity(F)), None
        for a, step in zip(F, o):
            p[a] = 1 if step else 0
        block = blocks[tuple(p)]
        for a, step in zip(F, o):
            if step:  # even 2j + step is odd 2j' + 1, j' = j - 1 or j
                pad = [(0, 0)] * d
                pad[a] = (1, 1)
                block = jax.lax.slice_in_dim(
                    jnp.pad(block, pad),
                    (step + 1) // 2,
                    (step + 1) // 2 + m + 1,
                    axis=a,
                )
        return block

    def P(uc):
        blocks = {(1,) * d: uc}
        for F in classes:
            blocks[parity(F)] = sum(
                weights[F][(..., *(b + 1 for b in o))] * neighbour(blocks, F, o)
                for o in itertools.product((-1, 0, 1), repeat=len(F))
                if any(o)
            )
        for axis in range(d):  # interleave the parities, one axis at a time
            blocks = {
                key[1:]: _interleave(blocks[(0, *key[1:])], blocks[key], axis)
                for key in blocks
                if key[0] == 1
            }
        return blocks[()]

    zeros = jax.ShapeDtypeStruct((m,) * d, w.dtype)
    transpose = jax.linear_transpose(P, zeros)
    return (lambda r: transpose(r)[0] / 2**d), P


def _interleave(even, odd, axis):
    """The grid whose nodes along `axis` are even's (m + 1) at even indices and
    odd's (m) at odd ones."""
    m = odd.shape[axis]
    head = jax.lax.slice_in_dim(even, 0, m, axis=axis)
    pair = jnp.stack([head, odd], axis=axis + 1)
    shape = list(odd.shape)
    shape[axis] = 2 * m
    tail = jax.lax.slice_in_dim(even, m, m + 1, axis=axis)
    return jnp.concatenate([pair.reshape(shape), tail], axis=axis)


def transfer_terms(n, d):
    """Multiply-adds a fine node of one operator-dependent transfer (P or R)
    on a grid of side n = 2m + 1: Σ_F (3^|F| - 1) (nodes of class F) / n^d."""
    m = (n - 1) // 2
    return (
        sum(
            math.comb(d, size) * (3**size - 1) * (m + 1) ** size * m ** (d - size)
            for size in range(1, d + 1)
        )
        / n**d
    )


def _colour_classes(n, ndim, modulus):
    """The nodes of an n^ndim grid by their indices mod `modulus`: one boolean
    mask per residue tuple, in `itertools.product` order."""
    idx = jnp.indices((n,) * ndim)
    return [
        functools.reduce(
            jnp.logical_and, [i % modulus == c for i, c in zip(idx, residues)]
        )
        for residues in itertools.product(range(modulus), repeat=ndim)
    ]


def _side(operator):
    """The grid side of an operator, from its diagonal's shape (not computed)."""
    return jax.eval_shape(operator.diagonal).shape[0]


def _ndim(operator):
    """The grid's dimension, likewise."""
    return jax.eval_shape(operator.diagonal).ndim


def _dtype(operator):
    """The operator's dtype, likewise."""
    return jax.eval_shape(operator.diagonal).dtype


class Multigrid(AbstractPreconditioner):
    """A multigrid cycle as M ≈ A⁻¹, for an operator that can coarsen itself
    (`coarsen()`, `diagonal()`, and `sweep(u, b, omega, backward)` for
    Gauss-Seidel: `iterjax.gallery.Poisson2D`, `Poisson3D`).

    Levels are made while the grid side is odd and >= 3 (n = 2^L - 1 goes down to
    one point); the bottom level is solved exactly (a dense solve of at most
    `coarsest`^d unknowns, its matrix built once by products there: at most 225
    in 2-D and 343 in 3-D by default).

    Products: `per_apply` counts the work of one cycle in fine-grid operator
    products, rounded up. A level's product weighs its nodes and its stencil's
    points against the fine operator's (`points`: 5 or 7 for the Poisson
    operators, 9 or 27 on Galerkin levels), so a rediscretised 2-D level counts
    1/4 and a 27-point Galerkin level under a 7-point operator 27/56. A
    Gauss-Seidel sweep counts the operator's `sweep_products` (red-black on the
    Poisson operators evaluates the stencil twice, a `Stencil`'s 2^d colours
    once in all), a Jacobi sweep or a residual one product; each level is
    weighted by how often the cycle visits it (the bottom level's dense
    triangular solves are not counted).

    Attributes:
      pre, post: smoothing sweeps before and after the coarse correction.
      cycle: "V" (one coarse cycle per level) or "W" (two).
      smoother: "gauss_seidel" (red-black; backward after) or "jacobi".
      omega: Jacobi's damping (4/5 is best for the 5-point Laplacian).
      coarsest: the largest side solved directly (else coarsened further;
        None: 15 in 2-D, 7 in 3-D).
      coarsening: "rediscretise" (`operator.coarsen()`) or "galerkin" (R A P,
        a `Stencil` of 3^d points, probed with 3^d products of the level above;
        below the first coarse level the Gauss-Seidel smoother runs in 2^d
        colours).
      interpolation: "multilinear" (P = 2^d Rᵀ, R full weighting) or
        "operator" (Galerkin levels only: `operator_transfer`, P from each
        level's own stencil, R = Pᵀ / 2^d; probing the fine operator's stencil
        costs 3^d products, and each transfer `transfer_terms` multiply-adds a
        node: a third of a 9-point product in 2-D, a quarter of a 27-point one
        in 3-D, counted in the cycle and in the 3^d probes of R A P).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A = iterjax.gallery.Poisson2D(jnp.ones((31, 31)))  # -Δu on a 31 x 31 grid
      >>> cg = iterjax.CG(preconditioner=iterjax.linear.Multigrid())
      >>> x, stats = cg.solve_with_stats(A, jnp.ones((31, 31)))
      >>> bool(stats.converged), int(stats.num_matvecs) < 120  # plain CG: 58
      (True, True)
    """

    pre: int = struct.field(pytree_node=False, default=1)
    post: int = struct.field(pytree_node=False, default=1)
    cycle: Literal["V", "W"] = struct.field(pytree_node=False, default="V")
    smoother: Literal["gauss_seidel", "jacobi"] = struct.field(
        pytree_node=False, default="gauss_seidel"
    )
    omega: float = 0.8
    coarsest: int | None = struct.field(pytree_node=False, default=None)
    coarsening: Literal["rediscretise", "galerkin"] = struct.field(
        pytree_node=False, default="rediscretise"
    )
    interpolation: Literal["multilinear", "operator"] = struct.field(
        pytree_node=False, default="multilinear"
    )

    def __post_init__(self):
        check_int("Multigrid", "pre", self.pre, 0)
        check_int("Multigrid", "post", self.post, 0)
        if self.coarsest is not None:
            check_int("Multigrid", "coarsest", self.coarsest, 1)
        if self.pre + self.post < 1:
            raise ValueError("Multigrid: `pre` + `post` must be >= 1 (no smoothing)")
        if self.cycle not in ("V", "W"):
            raise ValueError(
                f"Multigrid: `cycle` must be 'V' or 'W', got {self.cycle!r}"
            )
        if self.smoother not in ("gauss_seidel", "jacobi"):
            raise ValueError(
                "Multigrid: `smoother` must be 'gauss_seidel' or 'jacobi', got "
                f"{self.smoother!r}"
            )
        check_range("Multigrid", "omega", self.omega, 0.0, 1.0, lo_open=True)
        if self.coarsening not in ("rediscretise", "galerkin"):
            raise ValueError(
                "Multigrid: `coarsening` must be 'rediscretise' or 'galerkin', got "
                f"{self.coarsening!r}"
            )
        if self.interpolation not in ("multilinear", "operator"):
            raise ValueError(
                "Multigrid: `interpolation` must be 'multilinear' or 'operator', "
                f"got {self.interpolation!r}"
            )
        if self.interpolation == "operator" and self.coarsening != "galerkin":
            raise ValueError(
                "Multigrid: `interpolation`='operator' needs "
                "`coarsening`='galerkin' (the coarse operator R A P of its P)"
            )

    def levels(self, operator):
        """The operators from fine to coarse."""
        return self._hierarchy(operator)[0]

    def _hierarchy(self, operator):
        """The operators from fine to coarse, and the (R, P) between each level
        and the next."""
        if not callable(getattr(operator, "coarsen", None)):
            raise TypeError(
                "Multigrid: the operator must be a structured-grid operator with "
                "coarsen(), diagonal() and sweep() (e.g. iterjax.gallery.Poisson2D "
                "or Poisson3D), "
                f"got {type(operator).__name__}"
            )
        d = _ndim(operator)
        coarsest = self.coarsest or (15 if d <= 2 else 7)
        ops, transfers = [operator], []
        while _side(ops[-1]) > coarsest and _side(ops[-1]) % 2 == 1:
            A, n = ops[-1], _side(ops[-1])
            if self.interpolation == "operator":
                stencil = (
                    A if isinstance(A, Stencil) else Stencil.probe(A, n, _dtype(A), d)
                )
                transfers.append(operator_transfer(stencil))
            else:
                transfers.append(_multilinear(n))
            if self.coarsening == "galerkin":
                ops.append(Stencil.galerkin(A, n, transfers[-1]))
            else:
                ops.append(A.coarsen())
        if _side(ops[-1]) > coarsest:
            raise ValueError(
                f"Multigrid: a grid of side {_side(operator)} coarsens to side "
                f"{_side(ops[-1])} > `coarsest`={coarsest} (an even side "
                "cannot be halved): use a side 2^j (s + 1) - 1 with s <= coarsest, "
                "e.g. 2^j - 1"
            )
        return ops, transfers

    def build(self, matvec, b):
        ops, transfers = self._hierarchy(matvec)
        bottom = ops[-1]
        n, d = _side(bottom), _ndim(bottom)
        eye = jnp.eye(n**d, dtype=b.dtype).reshape(n**d, *(n,) * d)
        dense = jax.vmap(lambda e: bottom(e).reshape(-1))(eye).T
        factor = jax.scipy.linalg.cho_factor(dense)
        solve = lambda r: jax.scipy.linalg.cho_solve(factor, r.reshape(-1)).reshape(
            r.shape
        )

        def smooth(A, u, r, sweeps, backward):
            for _ in range(sweeps):
                if self.smoother == "gauss_seidel":
                    u = A.sweep(u, r, 1.0, backward=backward)
                else:
                    u = u + self.omega * (r - A(u)) / A.diagonal()
            return u

        def cycle(level, r):
            A = ops[level]
            if level == len(ops) - 1:
                return solve(r)
            R, P = transfers[level]
            u = smooth(A, jnp.zeros_like(r), r, self.pre, False)
            rc = R(r - A(u))
            uc = cycle(level + 1, rc)
            if self.cycle == "W" and level + 1 < len(ops) - 1:
                coarse = ops[level + 1]
                uc = uc + cycle(level + 1, rc - coarse(uc))
            u = u + P(uc)
            return smooth(A, u, r, self.post, True)

        # one product of A in fine-grid products: its nodes times its points
        cost = lambda A: (_side(A) / _side(matvec)) ** d * A.points / matvec.points
        gauss_seidel = self.smoother == "gauss_seidel"
        visits = 2 if self.cycle == "W" else 1
        work = 0.0
        for level, A in enumerate(ops[:-1]):
            sweep = A.sweep_products if gauss_seidel else 1
            here = (sweep * (self.pre + self.post) + 1) * cost(A)  # and a residual
            if self.interpolation == "operator":  # P and R, each class at its nodes
                here += 2 * cost(A) * transfer_terms(_side(A), d) / A.points
            if visits == 2 and level + 2 < len(ops):  # the second visit's residual
                here += cost(ops[level + 1])
            work += visits**level * here
        build = n**d * cost(bottom)  # n^d products to assemble the bottom
        if self.coarsening == "galerkin":  # 3^d products of the level above each
            build += sum(3**d * cost(A) for A in ops[:-1])
        if self.interpolation == "operator":  # and 3^d of each transfer around it
            terms = lambda A: transfer_terms(_side(A), d) / A.points
            build += sum(3**d * 2 * cost(A) * terms(A) for A in ops[:-1])
        if self.interpolation == "operator":  # the fine operator's stencil, probed
            build += 0 if isinstance(matvec, Stencil) else 3**d
        return (lambda r: cycle(0, r)), math.ceil(build), math.ceil(work)


class MultigridSolver(AbstractLinearSolver):
    """Multigrid as a solver: x ← x + M (b - A x), one `cycle` M per step, from
    x = 0, until ‖b - A x‖₂ <= max(rtol ‖b‖₂, atol). The residual tested is the
    one the next step uses, computed from x, so `converged` is its true value.
    Each step costs one product plus the cycle's (`Multigrid`'s count).

    It converges only where the cycle contracts (ρ(I - M A) < 1). On rough
    coefficient fields the rediscretised coarse operators break that and the
    iteration diverges (reported not converged, x growing); Galerkin levels
    (`Multigrid(coarsening="galerkin")`) restore it on moderately rough fields,
    and CG with either cycle as its preconditioner converges on all of them.

    Any preconditioner serves as the cycle; the multigrid ones contract:
    `Multigrid` on structured grids, `SmoothedAggregation` (algebraic) on a
    sparse matrix.

    Attributes:
      cycle: the cycle M (default: `Multigrid`'s V(1,1) with red-black
        Gauss-Seidel).
      rtol, atol: the tolerance (rtol None: 1e-8, or 10 ε for float32).
      max_steps: cap on cycles.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A, b = iterjax.gallery.Poisson2D(jnp.ones((31, 31))), jnp.ones((31, 31))
      >>> solver = iterjax.linear.MultigridSolver(rtol=1e-4)  # float32 reaches ~1e-5
      >>> x, stats = solver.solve_with_stats(A, b)
      >>> bool(stats.converged)
      True
    """

    cycle: AbstractPreconditioner = struct.field(pytree_node=False, default=Multigrid())
    rtol: float | None = None
    atol: float = 0.0
    max_steps: int = struct.field(pytree_node=False, default=100)

    transpose = "symmetric"  # reverse mode: one more solve (the cycle is SPD)

    def __post_init__(self):
        if not isinstance(self.cycle, AbstractPreconditioner):
            raise TypeError(
                "MultigridSolver: `cycle` must be a preconditioner (Multigrid, "
                f"SmoothedAggregation), got {self.cycle!r}"
            )
        if self.rtol is not None:
            check_range("MultigridSolver", "rtol", self.rtol, lo=0.0)
        check_range("MultigridSolver", "atol", self.atol, lo=0.0)
        check_int("MultigridSolver", "max_steps", self.max_steps, 1)

    def prepared(self, matvec):
        ready = self.cycle.prepared(matvec)
        return self if ready is self.cycle else self.replace(cycle=ready)

    def solve_with_stats(self, matvec, b, rtol=None):
        apply, cost, per_apply = self.cycle.build(matvec, b)
        rtol = default_rtol(b, rtol, self.rtol)
        tol = jnp.maximum(rtol * jnp.linalg.norm(b), self.atol)

        def cond(c):
            _, _, norm, k = c
            return (norm > tol) & (k < self.max_steps)

        def body(c):
            x, r, _, k = c
            x = x + apply(r)
            r = b - matvec(x)
            return x, r, jnp.linalg.norm(r), k + 1

        start = (jnp.zeros_like(b), b, jnp.linalg.norm(b), jnp.int32(0))
        x, _, norm, k = jax.lax.while_loop(cond, body, start)
        stats = LinearStats(
            k * (1 + per_apply) + cost, norm <= tol, ~jnp.isfinite(norm)
        )
        return nan_in_nan_out(b, x, stats)
