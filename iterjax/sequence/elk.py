"""ELK: Levenberg-Marquardt sweeps for stability on long or chaotic sequences."""

import jax
import jax.numpy as jnp
from flax import struct
from jax.scipy.sparse.linalg import cg

from .._checks import check_int, check_range
from ._core import AbstractSequenceMethod, linear_recurrence, prefix_scan, shift
from .deer import QuasiDEER


class ELK(AbstractSequenceMethod):
    """Levenberg-Marquardt (trust-region Newton) sweeps (Gonzalez et al. 2024).

    With M = I - ∂F/∂X (identity minus J_t on the sub-diagonal), each sweep solves

        min_δ  Σ_t |δ_t - J_t δ_{t-1} - r_t|^2 + λ_k Σ_t |δ_t|^2,
        i.e.   (M^T M + λ_k I) δ = M^T r,

    over the unaccepted positions. λ = 0 is DEER's Newton step; λ > 0 shortens and
    rotates it towards the gradient of the merit function Σ|r_t|^2, which keeps the
    iteration stable where Newton's step overshoots (chaotic or expanding cells).
    The damping follows the residual (Yamashita & Fukushima 2001),
    λ_k = damping * max_t |r_t|^2: strong far from the solution, vanishing near it,
    where the step becomes Newton's and convergence superlinear.
    The system is solved matrix-free by conjugate gradients, each CG step one
    parallel JVP and one VJP of the cell: O(T D) memory, no Jacobian is formed.
    (The paper solves the same problem as a parallel Kalman smoother.)

    Attributes:
      damping: scale of λ_k (> 0).
      cg_steps: conjugate-gradient iterations per sweep (>= 1); the system has
        condition number at most (|M|^2 + λ) / λ.
    """

    damping: float = 0.1
    cg_steps: int = struct.field(pytree_node=False, default=20)

    def __post_init__(self):
        super().__post_init__()
        check_range("ELK", "damping", self.damping, lo=0.0, lo_open=True)
        check_int("ELK", "cg_steps", self.cg_steps, 1)

    def sweep(self, cell, s0, X, xs, r, A, frozen):
        free = ~frozen[:, None]
        prev = shift(X, s0, self.mesh)
        _, jvp = jax.linearize(lambda P: jax.vmap(cell)(P, xs), prev)
        zero = jnp.zeros_like(s0)
        m = lambda v: v - jvp(shift(v, zero, self.mesh))  # M v
        mt = jax.linear_transpose(m, X)  # M^T, returns a 1-tuple
        lam = self.damping * jnp.max(jnp.sum(r**2, axis=-1))
        normal = lambda v: (
            jnp.where(free, mt(m(jnp.where(free, v, 0)))[0], 0) + (lam * v)
        )
        rhs = jnp.where(free, mt(r)[0], 0)
        delta, _ = cg(normal, rhs, tol=1e-10, maxiter=self.cg_steps)
        return delta


class QuasiELK(AbstractSequenceMethod):
    """Quasi-ELK: Levenberg-Marquardt sweeps with the diagonal Jacobian, solved
    exactly by a parallel Kalman smoother (Gonzalez et al. 2024).

    With a_t = diag ∂f/∂s (as `QuasiDEER`), each sweep minimises, per component,

        Σ_t (δ_t - a_t δ_{t-1} - r_t)^2 + λ Σ_t δ_t^2,   δ_0 = 0,

    over the unaccepted positions: the MAP estimate of a linear-Gaussian state-space
    model with dynamics δ_t = a_t δ_{t-1} + r_t + N(0, 1) and observations
    0 = δ_t + N(0, 1/λ). A Kalman filter and Rauch-Tung-Striebel smoother give it
    exactly, in parallel: the filtered variances P_t = (a_t^2 P_{t-1} + 1) /
    (λ a_t^2 P_{t-1} + λ + 1) are a Möbius recurrence (an associative scan of
    normalised 2x2 matrices), the filtered means and the smoothed means are affine
    recurrences (forward and reverse). O(T D) memory, O(log T) depth. λ follows the
    residual as in `ELK`: λ = damping * max_t |r_t|^2; λ -> 0 is `QuasiDEER`.

    Attributes:
      damping: scale of λ (> 0).
      jvp_batch: basis JVPs evaluated at once for the diagonal (see `QuasiDEER`).
    """

    damping: float = 0.1
    jvp_batch: int | None = struct.field(pytree_node=False, default=16)

    def __post_init__(self):
        super().__post_init__()
        check_range("QuasiELK", "damping", self.damping, lo=0.0, lo_open=True)
        if self.jvp_batch is not None:
            check_int("QuasiELK", "jvp_batch", self.jvp_batch, 1)

    def linearize(self, cell, prev, xs):
        return QuasiDEER(jvp_batch=self.jvp_batch).linearize(cell, prev, xs)

    def sweep(self, cell, s0, X, xs, r, A, frozen):
        lam = self.damping * jnp.max(jnp.sum(r**2, axis=-1))
        return kalman_smoother(A, r, lam, frozen, self.mesh)


def _mobius_combine(earlier, later):
    """The 2x2 matrices (a, b; c, d) of later @ earlier, scaled to max entry 1 (a
    Möbius map is unchanged by scaling, and the products would overflow)."""
    a1, b1, c1, d1 = earlier
    a2, b2, c2, d2 = later
    out = (
        a2 * a1 + b2 * c1,
        a2 * b1 + b2 * d1,
        c2 * a1 + d2 * c1,
        c2 * b1 + d2 * d1,
    )
    scale = jnp.maximum(jnp.maximum(out[0], out[1]), jnp.maximum(out[2], out[3]))
    return tuple(e / scale for e in out)


def _next(a, fill, mesh):
    """(a_2, ..., a_T, fill): the successor of every position."""
    return jnp.flip(shift(jnp.flip(a, 0), fill, mesh), 0)


def kalman_smoother(a, r, lam, frozen, mesh=None):
    """argmin_δ Σ_t (δ_t - a_t δ_{t-1} - r_t)^2 + λ δ_t^2 (elementwise, δ_0 = 0),
    with δ_t = 0 on `frozen` positions, by a parallel Kalman filter and
    Rauch-Tung-Striebel smoother (see `QuasiELK`)."""
    fz = frozen[:, None]
    ones, zeros = jnp.ones_like(a), jnp.zeros_like(a)
    a2 = a * a
    # Filtered variance: P_t = (a^2 P + 1) / (λ a^2 P + λ + 1), P_0 = 0; a frozen
    # position is observed exactly (P_t = 0).
    mats = (
        jnp.where(fz, 0, a2),
        jnp.where(fz, 0, ones),
        jnp.where(fz, 0, lam * a2),
        jnp.where(fz, 1, (lam + 1) * ones),
    )
    _, b, _, d = prefix_scan(_mobius_combine, mats, mesh)
    P = b / d
    P_pred = a2 * shift(P, zeros[0], mesh) + 1  # P^-_t
    gain = jnp.where(fz, 0, 1 / (1 + lam * P_pred))  # 1 - K_t
    m = linear_recurrence(gain * a, gain * r, mesh)  # filtered means
    # Smoother, backwards: δ_t = m_t + G_t (δ_{t+1} - a_{t+1} m_t - r_{t+1}).
    a_next = _next(a, zeros[0], mesh)
    G = P * a_next / (a_next**2 * P + 1)
    h = m - G * (a_next * m + _next(r, zeros[0], mesh))
    rev = lambda v: jnp.flip(v, 0)
    return rev(linear_recurrence(rev(G), rev(h), mesh))
