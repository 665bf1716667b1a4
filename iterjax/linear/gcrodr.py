"""GCRO-DR: recycled GMRES over a sequence of related non-symmetric systems.

Generalised conjugate residual with inner orthogonalisation and deflated
restarting (Parks, de Sturler, Mackey, Johnson & Maiti 2006, "Recycling Krylov
subspaces for sequences of linear systems"; the solver behind SKR, Wang et al.
2023). It carries a k-dimensional subspace U with A U = C, Cᵀ C = I, from one
restart cycle to the next and from one system to the next:

* for a new A, re-establish A U = C: QR of A U (k products), U ← U R⁻¹;
  then x ← x + U Cᵀ r, r ← r - C Cᵀ r (the best correction in U);
* each cycle runs s = m - k Arnoldi steps of (I - C Cᵀ) A from r / |r|,
  A V_s = C B + V_{s+1} H̄, and minimises the residual over span[U, V_s]:
  with Ŵ = [U D, V_s] (D scales U's columns to unit length) and
  V̂ = [C, V_{s+1}], A Ŵ = V̂ Ḡ, Ḡ = [[D, B], [0, H̄]], so
  y = argmin |β e_{k+1} - Ḡ y|, x ← x + Ŵ y, r ← V̂ (β e_{k+1} - Ḡ y);
* the next U is spanned by the k harmonic Ritz vectors of A on span Ŵ of
  smallest modulus, Ŵ z with Ḡᵀ Ḡ z = θ Ḡᵀ V̂ᵀ Ŵ z (complex pairs enter by
  their real and imaginary parts); QR of Ḡ Y gives C = V̂ Q, U = Ŵ Y R⁻¹, and
  r stays orthogonal to C (it is the least-squares residual).

Before the first cycle of the first system U is empty: that cycle is GMRES(s),
and its harmonic Ritz vectors seed U. Each system costs k products for A U, one
for the warm start, and s per cycle. The harmonic Ritz problem uses
`jnp.linalg.eig` (CPU and GPU; not TPU).
"""

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._checks import check_int, check_range
from ._base import LinearStats
from .krylov import arnoldi
from .recycle import RecycleState, Recycling


class GCRODR(Recycling):
    """GMRES with deflated restarting and a recycled subspace (GCRO-DR(m, k)),
    for a sequence of general square systems.

    Attributes:
      subspace: k, the dimension of the recycled subspace (>= 1).
      restart: m, the dimension of a cycle's search space: k recycled directions
        and m - k Arnoldi vectors (>= 2 k, so the first cycle alone can fill U).
      rtol, atol: stop when |b - A x|₂ <= max(rtol |b|₂, atol).
      max_cycles: cap on restart cycles per system (10 n / (m - k) when None).
      warm_start: start from the previous system's solution (one product).
    """

    subspace: int = struct.field(pytree_node=False, default=10)
    restart: int = struct.field(pytree_node=False, default=40)
    rtol: float = 1e-8
    atol: float = 0.0
    max_cycles: int | None = struct.field(pytree_node=False, default=None)
    warm_start: bool = struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        check_int("GCRODR", "subspace", self.subspace, 1)
        check_int("GCRODR", "restart", self.restart, 2 * self.subspace)
        check_range("GCRODR", "rtol", self.rtol, lo=0.0)
        check_range("GCRODR", "atol", self.atol, lo=0.0)
        if self.max_cycles is not None:
            check_int("GCRODR", "max_cycles", self.max_cycles, 1)

    def solve(self, matvec, b, state):
        """`(x, LinearStats, next state)` for `matvec(x) = b`."""
        flat_b, unravel, op, tol = self._system(matvec, b)
        n, k = flat_b.size, self.subspace
        self._check_state(state, n)
        s = self.restart - k
        max_cycles = -(-10 * n // s) if self.max_cycles is None else self.max_cycles

        x = state.previous if self.warm_start else jnp.zeros_like(flat_b)
        r = flat_b - op(x) if self.warm_start else flat_b
        U, C = _for_this_operator(op, state.basis)
        x, r = x + U @ (C.T @ r), r - C @ (C.T @ r)

        def cond(c):
            _, r, _, _, _, j = c
            return (jnp.linalg.norm(r) > tol) & (j < max_cycles)

        def body(c):
            x, r, U, C, products, j = c
            x, r, U, C, steps = _cycle(op, x, r, U, C, s, tol)
            return x, r, U, C, products + steps, j + 1

        start = (x, r, U, C, jnp.int32(k + int(self.warm_start)), jnp.int32(0))
        x, r, U, _, products, _ = jax.lax.while_loop(cond, body, start)
        norm = jnp.linalg.norm(r)
        stats = LinearStats(products, norm <= tol, ~jnp.isfinite(norm))
        ready = jnp.any(_live(U))
        return unravel(x), stats, RecycleState(U, ready, x)


def _live(U):
    """The columns of U that hold a direction (U starts as zeros)."""
    return jnp.linalg.norm(U, axis=0) > 0


def _divide_upper(Y, R, live):
    """Y R⁻¹ for upper-triangular R, on the `live` columns (zeros elsewhere)."""
    eye = jnp.eye(R.shape[0], dtype=R.dtype)
    R = jnp.where(live[None] & live[:, None], R, eye)
    return jnp.where(
        live[None], jax.scipy.linalg.solve_triangular(R, Y.T, trans=1).T, 0
    )


def _for_this_operator(op, U):
    """(U R⁻¹, Q) from the QR factorisation A U = Q R, so that A U = C again for
    this A; a column that has no direction, or loses it, is zero in both."""
    AU = jax.vmap(op, in_axes=1, out_axes=1)(U)
    Q, R = jnp.linalg.qr(AU)
    diag = jnp.abs(jnp.diag(R))
    live = _live(U) & (diag > 1e3 * jnp.finfo(R.dtype).eps * jnp.max(diag))
    return _divide_upper(U, R, live), jnp.where(live[None], Q, 0.0)


def _cycle(op, x, r, U, C, s, tol):
    """One restart cycle: minimise the residual over span[U, V], then the new
    (U, C) from the harmonic Ritz vectors. Columns of U without a direction
    (before U is filled) and Arnoldi columns not reached are kept out of both
    problems. Returns (x, r, U, C, products)."""
    k = U.shape[1]
    beta = jnp.linalg.norm(r)
    V, H, B, steps = arnoldi(op, r, C, s, tol)
    used = jnp.concatenate([_live(U), jnp.arange(s, dtype=jnp.int32) < steps])
    d = jnp.where(used[:k], 1 / jnp.where(used[:k], jnp.linalg.norm(U, axis=0), 1), 0)
    Ud = U * d[None]
    W = lambda y: Ud @ y[:k] + V[:s].T @ y[k:]  # Ŵ y, Ŵ = [U D, V_s]
    Vh = lambda y: C @ y[:k] + V.T @ y[k:]  # V̂ y, V̂ = [C, V]
    G = jnp.zeros((k + s + 1, k + s), r.dtype)
    G = G.at[:k, :k].set(jnp.diag(d)).at[:k, k:].set(B).at[k:, k:].set(H)
    c = jnp.zeros(k + s + 1, r.dtype).at[k].set(beta)
    y = jnp.linalg.lstsq(G, c)[0]
    x = x + W(y)
    r = Vh(c - G @ y)

    # harmonic Ritz: Gᵀ G z = θ Gᵀ V̂ᵀ Ŵ z; the unused columns kept out by θ = ∞.
    # V̂ᵀ Ŵ = [[Cᵀ U D, 0], [V U D, I]] (V ⟂ C, V orthonormal)
    VW = jnp.zeros((k + s + 1, k + s), r.dtype)
    VW = VW.at[:k, :k].set(C.T @ Ud).at[k:, :k].set(V @ Ud)
    VW = VW.at[k:, k:].set(
        jnp.where(used[None, k:], jnp.eye(s + 1, s, dtype=r.dtype), 0)
    )
    big = jnp.finfo(r.dtype).max ** 0.25
    lhs = G.T @ G + jnp.diag(jnp.where(used, 0.0, big))
    rhs = G.T @ VW + jnp.diag(jnp.where(used, 0.0, 1.0))
    theta, Z = jnp.linalg.eig(jnp.linalg.solve(rhs, lhs))
    Z = Z[:, jnp.argsort(jnp.abs(theta))[:k]]
    # a real basis of the k vectors' span: their real and imaginary parts
    Y = jnp.concatenate([Z.real, Z.imag], axis=1)
    Y = jnp.linalg.svd(Y, full_matrices=False)[0][:, :k]
    Y = jnp.where(used[:, None], Y, 0.0)
    Q, R = jnp.linalg.qr(G @ Y)
    diag = jnp.abs(jnp.diag(R))
    live = diag > 1e3 * jnp.finfo(R.dtype).eps * jnp.max(diag)
    U = _divide_upper(W(Y), R, live)
    return x, r, U, jnp.where(live[None], Vh(Q), 0.0), steps
