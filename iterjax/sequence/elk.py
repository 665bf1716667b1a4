"""ELK: Levenberg-Marquardt sweeps for stability on long or chaotic sequences."""

import jax
import jax.numpy as jnp
from flax import struct
from jax.scipy.sparse.linalg import cg

from .._checks import check_int, check_range
from ._core import AbstractSequenceMethod, shift


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
