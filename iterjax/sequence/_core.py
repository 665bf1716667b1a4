"""The one core behind every parallel-in-time method.

A recurrence s_t = f(s_{t-1}, x_t), t = 1..T, from a fixed s_0, is the fixed point of
the trajectory map

    F(X)_t = f(X_{t-1}, x_t),   X = (s_1, ..., s_T),  X_0 := s_0.

Every method takes sweeps of one update rule,

    X^{k+1}_t = f(X^k_{t-1}, x_t) + A_t (X^{k+1}_{t-1} - X^k_{t-1}),

solved for the correction δ = X^{k+1} - X^k as the linear recurrence

    δ_t = A_t δ_{t-1} + r_t,    r_t = f(X^k_{t-1}, x_t) - X^k_t,   δ_0 = 0,

with `jax.lax.associative_scan` (depth O(log T)). Only A_t differs: 0 (Jacobi),
I (Picard), diag J_t (quasi-Newton), J_t = ∂f/∂s at X^k_{t-1} (Newton, DEER).

Guarantees of the core, whatever A_t is:

* Frozen prefix. Positions whose residual meets the tolerance, and all before them,
  are kept as they are (their r is set to 0, so δ is exactly 0 there). The first
  unconverged position p then gets δ_p = r_p, i.e. X_p = f(X_{p-1}, x_p) from an
  accepted predecessor (enforced for methods that are not a linear recurrence):
  every sweep accepts at least one more position, so every method finishes in at
  most T sweeps.
* No garbage. A position whose update is not finite (a diverging Newton step, an
  overflowing Jacobian) falls back to the Jacobi update f(X^k_{t-1}, x_t), or keeps
  its value when that is not finite either; the number of sweeps with a fallback is
  reported. Non-finite residuals past the frontier are reported as the largest
  float, so that only a non-finite residual at an accepted predecessor (a genuine
  NaN of f) stops the solve as diverged.

The sweeps run on the fixed-point driver (`iterative_solve`), so stopping rules,
`vmap` with per-element sweep counts and residual traces come from there.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import struct

from .._iterate import AbstractFixedPointSolver


class AbstractSequenceMethod(struct.PyTreeNode):
    """How `iterjax.scan` solves a recurrence: the choice of A_t in the core update.

    Subclasses override `linearize` to choose A_t, or `sweep` for updates that are
    not a linear recurrence (`GaussSeidel`, `ELK`).
    """

    def linearize(self, cell, prev, xs):
        """`(f(prev_t, x_t), A_t)` for every t: A is None (zero, the default), (T, D)
        diagonal or (T, D, D) dense."""
        return jax.vmap(cell)(prev, xs), None

    def sweep(self, cell, s0, X, xs, r, A, frozen):
        """The correction δ of one sweep, given the residual r (zero on the frozen
        prefix) and the A_t of `linearize`."""
        return linear_recurrence(A, r)


def shift(X, s0):
    """The predecessors (s_0, s_1, ..., s_{T-1}) of X = (s_1, ..., s_T)."""
    return jnp.concatenate([s0[None], X[:-1]], axis=0)


def _diag_combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a2 * a1, a2 * b1 + b2


def _dense_combine(earlier, later):
    a1, b1 = earlier
    a2, b2 = later
    return a2 @ a1, jnp.einsum("...ij,...j->...i", a2, b1) + b2


def linear_recurrence(A, b):
    """δ_t = A_t δ_{t-1} + b_t from δ_0 = 0, for all t at once.

    `A` is None (δ = b), an array shaped like `b` (diagonal A_t) or with one more
    trailing axis (dense A_t). Composition of the affine maps δ -> A δ + b is
    associative, so `jax.lax.associative_scan` solves it in O(log T) depth.
    """
    if A is None:
        return b
    combine = _diag_combine if A.ndim == b.ndim else _dense_combine
    return jax.lax.associative_scan(combine, (A, b))[1]


def position_ok(r, X, atol, rtol):
    """Per position t: |r_t| <= atol + rtol |X_t| in every component."""
    bound = atol + rtol * jnp.abs(X)
    return jnp.all(jnp.abs(r) <= bound, axis=-1)


def accepted_prefix(ok):
    """True on the longest prefix of positions that are all ok."""
    return jnp.cumsum(~ok) == 0


class SweepState(NamedTuple):
    residual: jax.Array  # (T, D): f(X_{t-1}, x_t) - X_t, cleaned (see module doc)
    jacobian: object  # None, (T, D) or (T, D, D): A_t at the current X
    fallbacks: jax.Array  # int32: sweeps in which some position fell back


class Sweeps(AbstractFixedPointSolver):
    """Adapter running an `AbstractSequenceMethod` on the fixed-point driver.

    The driver's `fn` is the flat cell `cell(h, x, consts) -> h` and its `args` are
    `(s0, xs, consts)`.
    """

    method: AbstractSequenceMethod
    atol: float
    rtol: float

    def _evaluate(self, cell, X, args):
        s0, xs, consts = args
        fx, A = self.method.linearize(lambda h, x: cell(h, x, consts), shift(X, s0), xs)
        r = fx - X
        # Past the first unaccepted position a non-finite residual is an artefact
        # of a bad iterate, not of f: report it as large but finite.
        beyond = jnp.cumsum(~position_ok(r, X, self.atol, self.rtol)) > 1
        bad = beyond[:, None] & ~jnp.isfinite(r)
        r = jnp.where(bad, jnp.finfo(r.dtype).max, r)
        return r, A

    def summary(self, state):
        return {"fallbacks": state.fallbacks}

    def init(self, fn, y0, args):
        r, A = self._evaluate(fn, y0, args)
        return SweepState(r, A, jnp.int32(0))

    def step(self, fn, y, args, state):
        s0, xs, consts = args
        r = state.residual
        frozen = accepted_prefix(position_ok(r, y, self.atol, self.rtol))
        rm = jnp.where(frozen[:, None], 0, r)
        delta = self.method.sweep(
            lambda h, x: fn(h, x, consts), s0, y, xs, rm, state.jacobian, frozen
        )
        new = y + delta
        fine = jnp.all(jnp.isfinite(new), axis=-1)
        jacobi = jnp.where(jnp.abs(r) < jnp.finfo(r.dtype).max, y + r, y)
        new = jnp.where(fine[:, None], new, jacobi)
        # The first unaccepted position takes the exact step from its accepted
        # predecessor (automatic for linear-recurrence methods, enforced for ELK).
        frontier = jnp.cumsum(~frozen) == 1
        new = jnp.where(frontier[:, None], jacobi, new)
        new = jnp.where(frozen[:, None], y, new)
        r_new, A_new = self._evaluate(fn, new, args)
        fallbacks = state.fallbacks + jnp.any(~fine).astype(jnp.int32)
        return new, SweepState(r_new, A_new, fallbacks)
