"""The Chebyshev semi-iteration: a Krylov method without inner products."""

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from ._base import AbstractLinearSolver, LinearStats, nan_in_nan_out
from .krylov import default_rtol
from .preconditioners import chebyshev_direction, lanczos_bounds


class Chebyshev(AbstractLinearSolver):
    """Chebyshev semi-iteration for A x = b, A symmetric positive definite with
    spectrum in [λ_min, λ_max] (Golub & Varga 1961; Saad 2003, Algorithm 12.1).

    With θ = (λ_max + λ_min) / 2, δ = (λ_max - λ_min) / 2, from x_0 = b / θ:

        ρ_{k+1} = 1 / (2θ/δ - ρ_k),
        d_{k+1} = ρ_{k+1} ρ_k d_k + (2 ρ_{k+1} / δ) r_k,
        x_{k+1} = x_k + d_{k+1},   r_{k+1} = r_k - A d_{k+1},

    one product per step. The residual is the Chebyshev polynomial of least
    maximum on the interval, so |r_k| <= 2 q^k / (1 + q^{2k}) |b| with
    q = (√κ - 1) / (√κ + 1), κ = λ_max / λ_min: CG's worst-case rate, without
    CG's inner products (no global reduction per step, which is what costs on
    many devices) but with the bounds to know. The stopping test here takes one
    norm per step.

    Attributes:
      bounds: (λ_min, λ_max), or None to estimate them by `lanczos_steps`
        Lanczos steps from b, widened by `margin` (λ_min / margin,
        λ_max · margin): an interval that misses part of the spectrum diverges
        there.
      lanczos_steps: m >= 2, margin: >= 1.
      rtol, atol: stop when |b - A x|₂ <= max(rtol |b|₂, atol) (rtol=None:
        dtype-aware).
      max_steps: iteration cap (100 n when None: the steps grow like √κ, not
        with n as CG's do in exact arithmetic).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A, b = jnp.diag(jnp.arange(1.0, 11.0)), jnp.ones(10)  # spectrum [1, 10]
      >>> x, stats = iterjax.linear.Chebyshev(bounds=(1.0, 10.0)).solve_with_stats(A, b)
      >>> bool(stats.converged), bool(jnp.allclose(A @ x, b, atol=1e-4))
      (True, True)
    """

    transpose = "symmetric"  # reverse mode: one more solve

    bounds: tuple[float, float] | None = struct.field(pytree_node=False, default=None)
    lanczos_steps: int = struct.field(pytree_node=False, default=20)
    margin: float = 1.1
    rtol: float | None = None
    atol: float = 0.0
    max_steps: int | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        if self.bounds is not None:
            lo, hi = self.bounds
            if not 0 < lo < hi:
                raise ValueError(
                    "Chebyshev: `bounds` must be (λ_min, λ_max) with "
                    f"0 < λ_min < λ_max, got {self.bounds}"
                )
        check_int("Chebyshev", "lanczos_steps", self.lanczos_steps, 2)
        check_range("Chebyshev", "margin", self.margin, lo=1.0)
        if self.rtol is not None:
            check_range("Chebyshev", "rtol", self.rtol, lo=0.0)
        check_range("Chebyshev", "atol", self.atol, lo=0.0)
        if self.max_steps is not None:
            check_int("Chebyshev", "max_steps", self.max_steps, 1)

    def solve_with_stats(self, matvec, b, rtol=None):
        size = sum(jnp.size(a) for a in jax.tree_util.tree_leaves(b))
        max_steps = 100 * size if self.max_steps is None else self.max_steps
        if self.bounds is None:
            lo, hi = lanczos_bounds(matvec, b, self.lanczos_steps)
            lo, hi, cost = lo / self.margin, hi * self.margin, self.lanczos_steps
        else:
            (lo, hi), cost = self.bounds, 0
        theta, delta = (hi + lo) / 2, (hi - lo) / 2
        rtol = default_rtol(b, rtol, self.rtol)
        tol = jnp.maximum(rtol * tu.two_norm(b), self.atol)

        def cond(c):
            _, res, _, _, k = c
            return (tu.two_norm(res) > tol) & (k < max_steps)

        def body(c):
            x, res, d, rho, k = c
            d, rho = chebyshev_direction(d, res, rho, theta, delta)
            return tu.tree_add(x, d), tu.tree_sub(res, matvec(d)), d, rho, k + 1

        d = tu.tree_scale(1 / theta, b)
        init = (d, tu.tree_sub(b, matvec(d)), d, delta / theta, jnp.int32(0))
        x, res, _, _, k = jax.lax.while_loop(cond, body, init)
        norm = tu.two_norm(res)
        converged = norm <= tol
        stats = LinearStats(k + 1 + cost, converged, ~jnp.isfinite(norm))
        return nan_in_nan_out(b, x, stats)
