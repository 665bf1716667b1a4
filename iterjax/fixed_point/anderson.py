"""Anderson acceleration (type II), safeguarded."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._checks import check_int, check_range
from .._iterate import AbstractFixedPointSolver
from .._types import Array, Float, Int, Y
from ._flat import push, ravel, safe_div, tiny


class AndersonState(NamedTuple):
    residual: Y  # fn(y, args) - y
    r: Float[Array, " n"]  # the residual, flattened
    dy: Float[Array, "m n"]  # last m differences of iterates
    dr: Float[Array, "m n"]  # last m differences of residuals
    gram: Float[Array, "m m"]  # gram[i, j] = <dr_i, dr_j>
    pushed: Int[Array, ""]  # differences pushed so far


class Anderson(AbstractFixedPointSolver):
    """Anderson acceleration, type II (Walker & Ni 2011), in difference form.

    With r_k = f(y_k) - y_k and the last m differences ΔY, ΔR of iterates and
    residuals,

        γ_k = argmin_γ |r_k - ΔR γ|² + λ |D γ|²,   D = diag(|ΔR_i|)
        y_{k+1} = y_k + β r_k - (ΔY + β ΔR) γ_k

    One function evaluation per step. The least-squares problem is solved through
    the m x m Gram matrix after scaling its columns to unit norm, so the
    regularisation λ is relative (the unscaled, absolute ridge of other libraries
    swamps the Gram matrix once residuals are small and degrades Anderson to an
    average of old iterates). A non-finite solution falls back to a plain damped
    step. The Gram matrix is updated incrementally: O(m n) work per step.

    Attributes:
      history: m >= 1, the number of stored differences.
      mixing: β in (0, 1], the damping of the underlying Picard step.
      regularization: λ >= 0, relative Tikhonov regularisation (floored at 100 ε
        of the dtype).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> f = lambda z, a: jnp.cos(a * z)  # z* = cos(z*)
      >>> sol = iterjax.fixed_point(f, jnp.zeros(()), 1.0, solver=iterjax.Anderson(3))
      >>> bool(sol.converged), round(float(sol.value), 4)
      (True, 0.7391)
    """

    history: int = struct.field(pytree_node=False, default=5)
    mixing: float = 1.0
    regularization: float = 1e-8

    def __post_init__(self):
        check_int("Anderson", "history", self.history, 1)
        check_range("Anderson", "mixing", self.mixing, 0.0, 1.0, lo_open=True)
        check_range("Anderson", "regularization", self.regularization, lo=0.0)

    def init(self, fn, y0, args):
        residual = jax.tree_util.tree_map(lambda a, b: a - b, fn(y0, args), y0)
        r, _ = ravel(residual)
        m, n = self.history, r.shape[0]
        zeros = jnp.zeros((m, n), r.dtype)
        gram = jnp.zeros((m, m), r.dtype)
        return AndersonState(residual, r, zeros, zeros, gram, jnp.int32(0))

    def step(self, fn, y, args, state):
        y_flat, unravel = ravel(y)
        r, dy, dr, gram = state.r, state.dy, state.dr, state.gram
        beta = self.mixing
        gamma = self._coefficients(r, dr, gram, state.pushed)
        y_new = y_flat + beta * r - gamma @ (dy + beta * dr)
        y_new = y_new.astype(y_flat.dtype)

        y_tree = unravel(y_new)
        residual = jax.tree_util.tree_map(lambda a, b: a - b, fn(y_tree, args), y_tree)
        r_new, _ = ravel(residual)

        dr = push(dr, state.pushed, r_new - r)
        dy = push(dy, state.pushed, y_new - y_flat)
        col = jnp.conj(dr) @ (r_new - r)  # <dr_i, dr_new>
        idx = state.pushed % self.history
        gram = gram.at[:, idx].set(col).at[idx, :].set(jnp.conj(col))
        return y_tree, AndersonState(residual, r_new, dy, dr, gram, state.pushed + 1)

    def _coefficients(self, r, dr, gram, count):
        """γ of the column-scaled, regularised normal equations; 0 if non-finite."""
        m = self.history
        valid = jnp.arange(m, dtype=count.dtype) < count
        norms = jnp.sqrt(jnp.real(jnp.diagonal(gram)))
        small = tiny(r.dtype)
        inv = safe_div(jnp.ones_like(norms), norms, small).astype(r.dtype)
        eps = jnp.finfo(norms.dtype).eps
        lam = jnp.maximum(self.regularization, 100 * eps).astype(r.dtype)
        both = valid[:, None] & valid[None, :]
        scaled = jnp.where(both, gram * (inv[:, None] * inv[None, :]), 0)
        diag = jnp.where(valid, lam, jnp.ones_like(lam))
        system = scaled + jnp.eye(m, dtype=r.dtype) * diag[None, :]
        rhs = jnp.where(valid, (jnp.conj(dr) @ r) * inv, 0)
        gamma = jnp.linalg.solve(system, rhs) * inv
        return jnp.where(jnp.all(jnp.isfinite(gamma)), gamma, jnp.zeros_like(gamma))
