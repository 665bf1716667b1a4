"""ELK: Levenberg-Marquardt sweeps, solved exactly by a parallel Kalman smoother."""

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._checks import check_int, check_range
from ._core import AbstractSequenceMethod, linear_recurrence, prefix_scan, shift
from .deer import DEER, QuasiDEER


class ELK(AbstractSequenceMethod):
    """Levenberg-Marquardt (trust-region Newton) sweeps (Gonzalez et al. 2024).

    With J_t = ∂f/∂s at the current iterate (as `DEER`), each sweep minimises

        Σ_t |δ_t - J_t δ_{t-1} - r_t|^2 + λ Σ_t |δ_t|^2,   δ_0 = 0,
        i.e.   (M^T M + λ I) δ = M^T r,   M = I - subdiag(J_t),

    over the unaccepted positions. λ = 0 is DEER's Newton step; λ > 0 shortens and
    rotates it towards the gradient of the merit function Σ|r_t|^2, which keeps the
    iteration stable where Newton's step overshoots (chaotic or expanding cells).
    The damping follows the residual (Yamashita & Fukushima 2001),
    λ = damping * max_t |r_t|^2: strong far from the solution, vanishing near it,
    where the step becomes Newton's and convergence quadratic.

    The minimiser is the MAP estimate (the smoothed mean) of the linear-Gaussian
    state-space model δ_t = J_t δ_{t-1} + r_t + N(0, I), observed as
    0 = δ_t + N(0, I / λ), which `kalman_smoother` computes exactly with two
    associative scans: O(T D^2) memory (as DEER), O(log T) depth.

    The ELK paper's own parameterisation: a fixed λ = 1 / σ² (`sigmasq`, the
    emission variance of the model; large σ² is close to DEER) and a step with
    the Kalman filter means (`smooth=False`), which skips the smoother's scan:
    `ELK(sigmasq=1e2, smooth=False)` is the paper's ELK, and `QuasiELK(...)` with
    the same arguments its quasi-ELK.

    Attributes:
      damping: scale of the residual-tied λ (> 0); unused with `sigmasq`.
      sigmasq: σ² > 0 for a fixed λ = 1 / σ², or None (default) for the
        residual-tied λ.
      smooth: step with the smoothed means (True, default: the exact
        Levenberg-Marquardt step) or the filtered means (False, as the paper).

    Example:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> f = lambda h, x: (jnp.tanh(0.5 * h + x), h)
      >>> xs = jnp.ones((64, 3))
      >>> h, ys = iterjax.scan(f, jnp.zeros(3), xs, method=iterjax.ELK())
      >>> bool(jnp.allclose(ys, jax.lax.scan(f, jnp.zeros(3), xs)[1], atol=1e-5))
      True
    """

    damping: float = 0.1
    sigmasq: float | None = None
    smooth: bool = struct.field(pytree_node=False, default=True)

    def __post_init__(self):
        super().__post_init__()
        name = type(self).__name__
        check_range(name, "damping", self.damping, lo=0.0, lo_open=True)
        if self.sigmasq is not None:
            check_range(name, "sigmasq", self.sigmasq, lo=0.0, lo_open=True)
        if not isinstance(self.smooth, bool):
            raise TypeError(f"{name}: `smooth` must be a bool, got {self.smooth!r}")

    def linearize(self, cell, prev, xs):
        return DEER().linearize(cell, prev, xs)

    def sweep(self, cell, s0, X, xs, r, A, frozen):
        if self.sigmasq is None:
            lam = self.damping * jnp.max(jnp.sum(r**2, axis=-1))
        else:
            lam = 1 / jnp.asarray(self.sigmasq, r.dtype)
        return kalman_smoother(A, r, lam, frozen, self.mesh, self.smooth)


class QuasiELK(ELK):
    """Quasi-ELK: `ELK` with the diagonal Jacobian a_t = diag ∂f/∂s (as
    `QuasiDEER`). The smoother then runs per component: O(T D) memory and work.
    λ -> 0 is `QuasiDEER`.

    Attributes:
      damping, sigmasq, smooth: as for `ELK`.
      jvp_batch: basis JVPs evaluated at once for the diagonal (see `QuasiDEER`).

    Example:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> f = lambda h, x: (jnp.tanh(0.5 * h + x), h)
      >>> xs = jnp.ones((64, 3))
      >>> h, ys = iterjax.scan(f, jnp.zeros(3), xs, method=iterjax.QuasiELK())
      >>> bool(jnp.allclose(ys, jax.lax.scan(f, jnp.zeros(3), xs)[1], atol=1e-5))
      True
    """

    jvp_batch: int | None = struct.field(pytree_node=False, default=16)

    def __post_init__(self):
        super().__post_init__()
        if self.jvp_batch is not None:
            check_int("QuasiELK", "jvp_batch", self.jvp_batch, 1)

    def linearize(self, cell, prev, xs):
        return QuasiDEER(jvp_batch=self.jvp_batch).linearize(cell, prev, xs)


class _Ops:
    """The matrix operations of the smoother, for dense (..., D, D) or diagonal
    (..., D) matrices: one implementation serves ELK and QuasiELK."""

    def __init__(self, dense):
        if dense:
            self.mm = jnp.matmul
            self.mv = lambda a, v: jnp.einsum("...ij,...j->...i", a, v)
            self.t = lambda a: jnp.swapaxes(a, -1, -2)
            self.solve = solve  # M^{-1} X
            self.sym = lambda a: (a + self.t(a)) / 2
            eye = lambda a: jnp.eye(a.shape[-1], dtype=a.dtype)
        else:
            self.mm = self.mv = jnp.multiply
            self.t = self.sym = lambda a: a
            self.solve = lambda m, x: x / m
            eye = lambda a: jnp.ones((), a.dtype)
        self.eye = lambda a: jnp.broadcast_to(eye(a), a.shape)  # I, shaped like a


def solve(M, X):
    """M^{-1} X for batches of small dense matrices (..., D, D), (..., D, K).

    On CPU by `gauss_jordan` in plain XLA ops: the batched LAPACK solve there
    splits its batch over XLA's intra-op thread pool and waits for it, and
    several such solves at once (the devices of a host mesh, or concurrent ops)
    deadlock the pool. Elsewhere `jnp.linalg.solve`.
    """
    return jax.lax.platform_dependent(M, X, cpu=gauss_jordan, default=jnp.linalg.solve)


def gauss_jordan(M, X):
    """M^{-1} X by Gauss-Jordan elimination with partial pivoting: D steps, each
    a rank-one update of the batch of augmented matrices [M | X]."""
    D = M.shape[-1]
    rows = jnp.arange(D).reshape((1,) * (M.ndim - 2) + (D,))

    def eliminate(k, aug):
        col = jnp.where(rows >= k, jnp.abs(aug[..., :, k]), -1)
        p = jnp.argmax(col, axis=-1)[..., None]  # the pivot row, per matrix
        row_k = aug[..., k, :]
        row_p = jnp.take_along_axis(aug, p[..., None], axis=-2)[..., 0, :]
        is_k, is_p = (rows == k)[..., None], (rows == p)[..., None]
        aug = jnp.where(
            is_k, row_p[..., None, :], jnp.where(is_p, row_k[..., None, :], aug)
        )
        pivot = row_p / row_p[..., k, None]
        factor = jnp.where(rows == k, 0, aug[..., :, k])
        aug = aug - factor[..., None] * pivot[..., None, :]
        return jnp.where(is_k, pivot[..., None, :], aug)

    aug = jax.lax.fori_loop(0, D, eliminate, jnp.concatenate([M, X], axis=-1))
    return aug[..., D:]


def _filter_combine(ops):
    """Särkkä & García-Fernández (2021), Lemma 8: compose the filtering elements
    (A, b, C, η, J) of an earlier and a later block of steps."""
    mm, mv, t = ops.mm, ops.mv, ops.t

    def combine(earlier, later):
        A1, b1, C1, e1, J1 = earlier
        A2, b2, C2, e2, J2 = later
        eye = ops.eye(A1)
        inv = ops.solve(eye + mm(C1, J2), eye)  # (I + C_1 J_2)^{-1}
        W, V = mm(A2, inv), t(mm(inv, A1))  # A_2 M^{-1}, A_1^T M^{-T}
        return (
            mm(W, A1),
            mv(W, b1 + mv(C1, e2)) + b2,
            ops.sym(mm(mm(W, C1), t(A2)) + C2),
            mv(V, e2 - mv(J2, b1)) + e1,
            ops.sym(mm(mm(V, J2), A1) + J1),
        )

    return combine


def kalman_smoother(A, r, lam, frozen, mesh=None, smooth=True):
    """argmin_δ Σ_t |δ_t - A_t δ_{t-1} - r_t|^2 + λ |δ_t|^2 with δ_0 = 0 and δ_t = 0
    on the `frozen` positions, by a parallel Kalman filter and Rauch-Tung-Striebel
    smoother (Särkkä & García-Fernández 2021).

    The model is δ_t = A_t δ_{t-1} + r_t + N(0, I), observed as 0 = δ_t + N(0, I/λ)
    (exactly, λ = ∞, where frozen). With ρ = 1 / (1 + λ) and κ = λ / (1 + λ), step
    t's filtering element is

        (A, b, C, η, J)_t = (ρ A_t, ρ r_t, ρ I, -κ A_t^T r_t, κ A_t^T A_t),

    and `prefix_scan` of them gives the filtered means m_t (the b's) and
    covariances P_t (the C's); δ_0 = 0 is known, so the first element needs no
    special case. The smoother is the reverse affine recurrence
    δ_t = E_t δ_{t+1} + m_t - E_t (A_{t+1} m_t + r_{t+1}),
    E_t = P_t A_{t+1}^T (A_{t+1} P_t A_{t+1}^T + I)^{-1}.

    `A` is (T, D, D) (dense) or (T, D) (diagonal: every component independently).
    With `smooth=False` the filtered means m_t are returned instead (ELK paper's
    step): each position then sees only the residuals up to its own.
    """
    ops = _Ops(dense=A.ndim == r.ndim + 1)
    lam = jnp.asarray(lam, r.dtype)
    rho = jnp.where(frozen, 0, 1 / (1 + lam))
    kappa = jnp.where(frozen, 1, 1 / (1 + 1 / lam))  # λ / (1 + λ), λ = ∞ safe
    per = lambda c, a: c.reshape(c.shape + (1,) * (a.ndim - 1)) * a  # c_t a_t
    At = ops.t(A)
    elems = (
        per(rho, A),
        per(rho, r),
        per(rho, ops.eye(A)),
        -per(kappa, ops.mv(At, r)),
        per(kappa, ops.mm(At, A)),
    )
    _, m, P, _, _ = prefix_scan(_filter_combine(ops), elems, mesh)
    if not smooth:
        return m

    def successor(a):  # (a_2, ..., a_T, 0)
        return jnp.flip(shift(jnp.flip(a, 0), jnp.zeros_like(a[0]), mesh), 0)

    A_next, r_next = successor(A), successor(r)
    FP = ops.mm(A_next, P)
    E = ops.t(ops.solve(ops.mm(FP, ops.t(A_next)) + ops.eye(A), FP))
    g = m - ops.mv(E, ops.mv(A_next, m) + r_next)
    rev = lambda v: jnp.flip(v, 0)
    return rev(linear_recurrence(rev(E), rev(g), mesh))
