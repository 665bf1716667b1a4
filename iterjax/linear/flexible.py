"""Flexible conjugate gradients: a preconditioner that may be nonlinear or change
from step to step (a trained network, an inner iterative solve)."""

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int
from ._base import LinearStats, nan_in_nan_out, residual_within
from .krylov import _Krylov, default_rtol

COSINE_FLOOR = 1e-8  # |cos(r, d)| below: numerically orthogonal, no step


class FlexibleCG(_Krylov):
    """Conjugate directions with any direction generator z = M(r), for A
    symmetric positive definite: flexible CG (Notay 2000), and with a network
    as M the Deep Conjugate Direction method (Kaneda et al. 2023).

    From x_0 = 0, r_0 = b, one product a step:

        z = M(r)
        d = z - Σ_j (z·A d_j / d_j·A d_j) d_j      (the last `memory` directions)
        α = r·d / d·A d,   x += α d,   r -= α A d

    Each step is an exact line search along an A-conjugate direction, so the
    error's A-norm never grows, whatever M is. M need not be linear, symmetric
    or positive (CG with such an M can diverge or stop on a false residual). A
    direction that is not finite, or numerically orthogonal to r (|cos(r, d)|
    < 1e-8: no step), is replaced by r's own conjugated direction: a poor
    network costs steps, never the answer. (A larger floor would also replace
    good directions: a fixed SPD M's M r can be far from r.) With a fixed SPD
    M and memory >= 1 it is preconditioned CG in exact arithmetic. With a
    nonlinear M the truncated conjugation loses CG's global optimality: a
    generator close to A⁻¹ up to a few per cent converges in few steps, a
    weak one (close to a nonlinear map of r) can need many more steps than
    CG; `memory` = the number of unknowns keeps every direction (n steps in
    exact arithmetic, whatever M).

    `converged` is the true residual |b - A x|₂ <= max(rtol |b|₂, atol),
    recomputed at the end (one product more, counted).

    Attributes:
      memory: the directions each new one is made A-orthogonal to (>= 1; the
        Deep Conjugate Direction paper uses 2).
      preconditioner: the direction generator: a function r -> z (pytree to
        pytree), or any iterjax preconditioner (None: z = r, CG).
      rtol, atol, max_steps: as for `CG`.
    """

    transpose = "symmetric"  # reverse mode: one more solve

    memory: int = struct.field(pytree_node=False, default=2)

    def __post_init__(self):
        self._check()
        check_int("FlexibleCG", "memory", self.memory, 1)

    def solve_with_stats(self, matvec, b, rtol=None):
        flat_b, unravel = tu.ravel(b)
        n, m = flat_b.shape[0], self.memory
        max_steps = 10 * n if self.max_steps is None else self.max_steps
        apply, cost, per_apply = self._preconditioner(matvec, b)
        op = lambda v: tu.ravel(matvec(unravel(v)))[0]
        generate = lambda r: tu.ravel(apply(unravel(r)))[0]
        rtol = default_rtol(b, rtol, self.rtol)
        tol = jnp.maximum(rtol * jnp.linalg.norm(flat_b), self.atol)

        def conjugate(z, D, AD, dad):
            """z made A-orthogonal to the stored directions (unused rows: 0)."""
            coeff = (AD @ z) / jnp.where(dad > 0, dad, 1)
            return z - coeff @ D

        def cond(c):
            _, r, *_, k, ok = c
            return (jnp.linalg.norm(r) > tol) & (k < max_steps) & ok

        def body(c):
            x, r, D, AD, dad, k, _ = c
            z = generate(r)
            d = conjugate(z / jnp.linalg.norm(z), D, AD, dad)  # its scale is α's
            cosine = jnp.abs(r @ d) / (jnp.linalg.norm(r) * jnp.linalg.norm(d))
            useful = jnp.all(jnp.isfinite(d)) & (cosine >= COSINE_FLOOR)
            d = jnp.where(useful, d, conjugate(r, D, AD, dad))
            ad = op(d)
            pap = d @ ad
            ok = pap > 0
            alpha = jnp.where(ok, (r @ d) / jnp.where(ok, pap, 1), 0)
            slot = k % m
            return (
                x + alpha * d,
                r - alpha * ad,
                D.at[slot].set(d),
                AD.at[slot].set(ad),
                dad.at[slot].set(pap),
                k + 1,
                ok,
            )

        zeros = jnp.zeros((m, n), flat_b.dtype)
        start = (
            jnp.zeros_like(flat_b),
            flat_b,
            zeros,
            zeros,
            jnp.zeros(m, flat_b.dtype),
            jnp.int32(0),
            jnp.array(True),
        )
        x, _, _, _, _, k, ok = jax.lax.while_loop(cond, body, start)
        x = unravel(jnp.where(ok, x, jnp.nan))  # A not positive definite: NaN
        converged = ok & residual_within(matvec, b, x, tol)
        stats = LinearStats(k * (1 + per_apply) + cost + 1, converged, ~ok)
        return nan_in_nan_out(b, x, stats)
