"""Krylov subspace recycling: CG over a sequence of related SPD systems.

A sequence A_1 x = b_1, A_2 x = b_2, ... of symmetric positive definite systems
that change slowly (a PDE's coefficients along a parameter sweep, Newton's
Hessians) share their troublesome part: the eigenvectors of the smallest
eigenvalues, which set CG's iteration count. Recycled CG (deflated CG, Saad,
Yeung, Erhel & Guyomarc'h 2000; recycling as in Parks et al. 2006, and the
sorted sequences of SKR, Wang et al. 2023, "Accelerating data generation for
neural operators via Krylov subspace recycling") carries a k-dimensional
subspace U from one solve to the next:

* start from the Galerkin solution in U: x_0 = U W⁻¹ Uᵀ b, W = Uᵀ A U;
* run CG with every direction made A-orthogonal to U,
  p ← r + β p - U W⁻¹ (A U)ᵀ r, so CG works on A restricted to U's
  A-orthogonal complement, whose smallest eigenvalues are gone from the rate;
* keep the first m directions p_j and products A p_j, and take as the next U
  the k Ritz vectors of smallest Ritz value of A on span[U, P] (no product
  beyond those already made).

Each system costs k products for A U (A changed) plus one per CG step.
`RecycledCG.solve(matvec, b, state) -> (x, stats, state)` is pure, so
`solve_sequence` runs a whole sequence in one `lax.scan`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from .._types import Array, Bool, Float
from ._base import LinearStats
from .krylov import check_square, flat_system


class RecycleState(NamedTuple):
    basis: Float[Array, "n k"]  # the recycled subspace U (zeros before the first solve)
    ready: Bool[Array, ""]  # U holds a subspace
    previous: Float[Array, " n"]  # the last solution (the next start, `warm_start`)


class Recycling(struct.PyTreeNode):
    """What the recycling solvers share: the state they carry between systems
    (`init`) and the flattened system with its stopping tolerance. Subclasses
    declare `subspace`, `rtol`, `atol` and `warm_start`."""

    def init(self, b):
        """The empty state for systems shaped like `b` (a pytree)."""
        flat = tu.ravel(b)[0]
        basis = jnp.zeros((flat.size, self.subspace), flat.dtype)
        return RecycleState(basis, jnp.bool_(False), jnp.zeros_like(flat))

    def _check_state(self, state, n):
        """ValueError unless `state` (a `RecycleState`) is for systems of size n."""
        owner = type(self).__name__
        if not isinstance(state, RecycleState):
            raise TypeError(
                f"{owner}.solve: `state` must be a RecycleState (from `init`), got "
                f"{type(state).__name__}"
            )
        if state.basis.shape[0] != n:
            raise ValueError(
                f"{owner}.solve: `state` was made for systems of size "
                f"{state.basis.shape[0]}, but b has {n} elements; make one with "
                f"init(b) for these systems"
            )

    def _system(self, matvec, b):
        """`krylov.flat_system` at the solver's tolerances (a square one)."""
        check_square(type(self).__name__, matvec, b)
        return flat_system(matvec, b, self.rtol, self.atol)


class RecycledCG(Recycling):
    """CG with a recycled subspace, for a sequence of SPD systems.

    Attributes:
      subspace: k, the dimension of the recycled subspace (>= 1).
      stored: m, the CG directions kept for the next subspace (>= k).
      rtol, atol: stop when |b - A x|₂ <= max(rtol |b|₂, atol).
      max_steps: CG's iteration cap (10 n when None).
      warm_start: start from the previous system's solution, corrected in U
        (x_0 = x_prev + U W⁻¹ Uᵀ (b - A x_prev)); else from the Galerkin
        solution in U alone. One product more per system.
    """

    subspace: int = struct.field(pytree_node=False, default=20)
    stored: int = struct.field(pytree_node=False, default=40)
    rtol: float = 1e-8
    atol: float = 0.0
    max_steps: int | None = struct.field(pytree_node=False, default=None)
    warm_start: bool = struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        check_int("RecycledCG", "subspace", self.subspace, 1)
        check_int("RecycledCG", "stored", self.stored, self.subspace)
        check_range("RecycledCG", "rtol", self.rtol, lo=0.0)
        check_range("RecycledCG", "atol", self.atol, lo=0.0)
        if self.max_steps is not None:
            check_int("RecycledCG", "max_steps", self.max_steps, 1)

    def solve(self, matvec, b, state):
        """`(x, LinearStats, next state)` for `matvec(x) = b`."""
        flat_b, unravel, op, tol = self._system(matvec, b)
        n, k, m = flat_b.size, self.subspace, self.stored
        max_steps = 10 * n if self.max_steps is None else self.max_steps
        self._check_state(state, n)
        U = state.basis
        AU = jax.vmap(op, in_axes=1, out_axes=1)(U)
        # zero columns (before the first solve, or where span[U, P] had fewer
        # than k dimensions) are left out: W is the identity there
        absent = jnp.all(U == 0, axis=0) | ~state.ready
        W = U.T @ AU + jnp.diag(absent.astype(U.dtype))
        W_inv = lambda y: jnp.linalg.solve(W, y)
        deflate = lambda r: r - U @ W_inv(AU.T @ r)

        if self.warm_start:
            x0 = state.previous
            r0 = flat_b - op(x0)
            x = x0 + U @ W_inv(U.T @ r0)
        else:
            x = U @ W_inv(U.T @ flat_b)
        r = flat_b - op(x)
        p = deflate(r)
        P = jnp.zeros((n, m), flat_b.dtype)

        def cond(c):
            _, r, _, _, _, j = c
            return (jnp.linalg.norm(r) > tol) & (j < max_steps)

        def body(c):
            x, r, p, P, AP, j = c
            ap = op(p)
            rr = r @ r
            alpha = rr / (p @ ap)
            x, r_new = x + alpha * p, r - alpha * ap
            keep = j < m  # the first m directions
            P = jnp.where(keep, P.at[:, jnp.minimum(j, m - 1)].set(p), P)
            AP = jnp.where(keep, AP.at[:, jnp.minimum(j, m - 1)].set(ap), AP)
            p = deflate(r_new) + (r_new @ r_new) / rr * p
            return x, r_new, p, P, AP, j + 1

        x, r, _, P, AP, steps = jax.lax.while_loop(
            cond, body, (x, r, p, P, P, jnp.int32(0))
        )
        basis = _ritz_basis(U, AU, P, AP, k, state.ready)
        norm = jnp.linalg.norm(r)
        products = k + 1 + steps + int(self.warm_start)
        stats = LinearStats(products, norm <= tol, ~jnp.isfinite(norm))
        return unravel(x), stats, RecycleState(basis, jnp.bool_(True), x)


def _ritz_basis(U, AU, P, AP, k, ready):
    """The k Ritz vectors of smallest Ritz value of A on span[U, P] (columns of
    zeros, and U before it is ready, are left out)."""
    Z = jnp.concatenate([U, P], axis=1)
    AZ = jnp.concatenate([AU, AP], axis=1)
    used = jnp.concatenate(
        [jnp.broadcast_to(ready, (U.shape[1],)), jnp.any(P != 0, axis=0)]
    )
    Z, AZ = jnp.where(used[None], Z, 0.0), jnp.where(used[None], AZ, 0.0)
    s, V = jnp.linalg.eigh(Z.T @ Z)  # an orthonormal basis of span Z
    keep = s > 1e-10 * jnp.max(s)
    T = V * jnp.where(keep, 1 / jnp.sqrt(jnp.where(keep, s, 1)), 0.0)[None]
    G = T.T @ (Z.T @ AZ) @ T
    G = (G + G.T) / 2 + jnp.diag(jnp.where(keep, 0.0, jnp.inf))
    G = jnp.where(jnp.isinf(G), jnp.finfo(G.dtype).max / 4, G)
    _, Y = jnp.linalg.eigh(G)
    basis = Z @ (T @ Y[:, :k])
    # fewer than k dimensions (a small system, or CG done in fewer steps): the
    # columns past them stay zero rather than repeat the span (W singular)
    real = jnp.arange(basis.shape[1]) < jnp.sum(keep)
    basis = jnp.where(real[None], basis, 0.0)
    return basis / jnp.maximum(jnp.linalg.norm(basis, axis=0), 1e-300)[None]


def solve_sequence(solver, matvec, systems, bs):
    """Solve `matvec(system, x) = b` for every system in order, recycling.

    Args:
      solver: a `RecycledCG` (SPD systems) or a `GCRODR` (general ones).
      matvec: `matvec(system, x) -> A x`.
      systems: a pytree with the systems along axis 0.
      bs: the right-hand sides along axis 0.

    Returns:
      `(xs, LinearStats)`, both along axis 0 (`num_matvecs` per system).
    """
    first = jax.tree_util.tree_map(lambda a: a[0], bs)

    def step(state, item):
        system, b = item
        x, stats, state = solver.solve(lambda v: matvec(system, v), b, state)
        return state, (x, stats)

    _, (xs, stats) = jax.lax.scan(step, solver.init(first), (systems, bs))
    return xs, stats


def similarity_order(features):
    """A greedy nearest-neighbour tour of the systems (SKR's sorting): start at
    system 0, then always go to the nearest unvisited one (Euclidean distance
    of `features`, shape (N, d)). Returns the permutation (N,), int32.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> features = jnp.array([[0.0], [5.0], [1.0], [4.0]])
      >>> iterjax.linear.similarity_order(features).tolist()
      [0, 2, 3, 1]"""
    features = jnp.asarray(features)
    n = features.shape[0]
    dist = jnp.sum((features[:, None] - features[None]) ** 2, axis=-1)

    def step(carry, _):
        current, visited = carry
        d = jnp.where(visited, jnp.inf, dist[current])
        nxt = jnp.argmin(d).astype(jnp.int32)
        return (nxt, visited.at[nxt].set(True)), nxt

    visited = jnp.zeros(n, bool).at[0].set(True)
    _, rest = jax.lax.scan(step, (jnp.int32(0), visited), None, length=n - 1)
    return jnp.concatenate([jnp.zeros(1, jnp.int32), rest])
