"""Entropic optimal transport: Sinkhorn's iteration as a fixed point."""

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .._checks import check_range
from .._iterate import AbstractFixedPointSolver
from .._solution import Solution
from .._types import ArrayLike, Float
from ..fixed_point import Picard, fixed_point


class Potentials(NamedTuple):
    """Dual potentials of entropic OT: the plan is exp((f_i + g_j - C_ij) / ε)."""

    f: jax.Array  # shape (n,)
    g: jax.Array  # shape (m,)


def sinkhorn(
    cost: Float[ArrayLike, "n m"],
    a: Float[ArrayLike, " n"],
    b: Float[ArrayLike, " m"],
    epsilon: float | Float[ArrayLike, ""],
    h0: Float[ArrayLike, " m"] | None = None,
    *,
    solver: AbstractFixedPointSolver = Picard(),
    **options,
) -> Solution:
    """Entropic optimal transport between histograms `a` and `b`.

        min_P  <P, C> - ε H(P)   subject to  P 1 = a,  Pᵀ 1 = b,

    solved through its dual potentials. With h = g / ε, Sinkhorn's iteration in
    the log domain is the fixed-point map

        f(h) = ε log a - ε LSE_j(h_j - C_ij / ε),
        T(h) = log b - LSE_i(f_i / ε - C_ij / ε),

    taken modulo constants (T(h + t) = T(h) + t: the potentials are defined up to
    (f + εt, g - εt)), so iterjax iterates T(h) - mean T(h), whose Jacobian has
    no unit eigenvalue. At a fixed point P 1 = a exactly and the residual
    T(h) - h = -log(Pᵀ1 / b) + const bounds the relative error of the second
    marginal: `atol` = 1e-10 gives ‖Pᵀ1 - b‖₁ of about 1e-10.

    Every `fixed_point` solver applies:

    * `Picard()` (default) is Sinkhorn's algorithm;
    * `Anderson()` is Anderson-accelerated Sinkhorn;
    * `Switched(Picard(), Backtracking(Newton()), after=k)` is Sinkhorn followed
      by Newton steps with a line search (Tang et al. 2024, "Accelerating
      Sinkhorn algorithm with sparse Newton iterations"): GMRES on exact
      Jacobian-vector products of T, which cost about two Sinkhorn steps each
      (the paper's sparsified Hessian is not used). Without the line search,
      full Newton steps diverge at small ε.

    Gradients with respect to `cost`, `a`, `b` and `epsilon` go through the
    fixed-point adjoint (implicit by default): memory independent of the number
    of iterations.

    Args:
      cost: (n, m) cost matrix, finite.
      a, b: (n,) and (m,) positive weights with equal sums.
      epsilon: the entropic regularisation, > 0 (in the units of `cost`).
      h0: initial g / ε, shape (m,); zeros by default (warm starts: a previous
        solution's `g / epsilon`).
      solver: a `fixed_point` solver.
      **options: `fixed_point`'s options (atol, rtol, max_steps, adjoint, throw,
        trace, norm).

    Returns:
      `fixed_point`'s `Solution` whose value is `Potentials(f, g)`.
    """
    cost, a, b = (jnp.asarray(x) for x in (cost, a, b))
    _check(cost, a, b, epsilon)
    eps = jnp.asarray(epsilon, cost.dtype)
    if h0 is None:
        h0 = jnp.zeros(cost.shape[1], cost.dtype)
    args = (cost, jnp.log(a), jnp.log(b), eps)
    sol = fixed_point(_sinkhorn_map, h0, args, solver=solver, **options)
    f = _f_potential(sol.value, *args)
    return dataclasses.replace(sol, value=Potentials(f, eps * sol.value))


def transport_plan(cost, potentials, epsilon):
    """P_ij = exp((f_i + g_j - C_ij) / ε)."""
    f, g = potentials
    return jnp.exp((f[:, None] + g[None, :] - cost) / epsilon)


def marginal_error(cost, a, b, potentials, epsilon):
    """‖P 1 - a‖₁ + ‖Pᵀ 1 - b‖₁ of the plan of `potentials`."""
    plan = transport_plan(cost, potentials, epsilon)
    return jnp.sum(jnp.abs(plan.sum(1) - a)) + jnp.sum(jnp.abs(plan.sum(0) - b))


def _f_potential(h, cost, log_a, log_b, eps):
    return eps * (log_a - jax.nn.logsumexp(h[None, :] - cost / eps, axis=1))


def _sinkhorn_map(h, args):
    cost, log_a, log_b, eps = args
    f = _f_potential(h, *args)
    t = log_b - jax.nn.logsumexp(f[:, None] / eps - cost / eps, axis=0)
    return t - jnp.mean(t)


def _check(cost, a, b, epsilon):
    if cost.ndim != 2:
        raise ValueError(f"sinkhorn: `cost` must be a matrix, got shape {cost.shape}")
    if a.shape != (cost.shape[0],) or b.shape != (cost.shape[1],):
        raise ValueError(
            f"sinkhorn: `a` and `b` must have shapes ({cost.shape[0]},) and "
            f"({cost.shape[1]},) for a cost of shape {cost.shape}; got {a.shape} "
            f"and {b.shape}"
        )
    for name, x in (("cost", cost), ("a", a), ("b", b)):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"sinkhorn: `{name}` must be a float array, got {x.dtype}")
    check_range("sinkhorn", "epsilon", epsilon, lo=0.0, lo_open=True)
    if any(isinstance(x, jax.core.Tracer) for x in (cost, a, b)):
        return  # traced: the checks below need values
    cost, a, b = (np.asarray(x) for x in (cost, a, b))
    if not np.all(np.isfinite(cost)):
        raise ValueError("sinkhorn: `cost` has NaN or infinite entries")
    for name, w in (("a", a), ("b", b)):
        if not np.all(w > 0):
            raise ValueError(
                f"sinkhorn: the weights `{name}` must be positive (drop the points "
                f"of zero weight); its smallest entry is {w.min()}"
            )
    if not np.isclose(a.sum(), b.sum(), rtol=1e-6):
        raise ValueError(
            f"sinkhorn: `a` and `b` must have equal sums (balanced transport), "
            f"got {a.sum()} and {b.sum()}"
        )
