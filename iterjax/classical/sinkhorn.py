"""Entropic optimal transport: Sinkhorn's iteration as a fixed point."""

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .. import _struct as struct
from .._checks import check_range
from .._iterate import AbstractFixedPointSolver
from .._solution import Solution
from .._types import Array, ArrayLike, Float, Int
from ..fixed_point import Picard, fixed_point
from ..linear import CG


class Potentials(NamedTuple):
    """Dual potentials of entropic OT: the plan is exp((f_i + g_j - C_ij) / ε)."""

    f: Float[Array, " n"]
    g: Float[Array, " m"]


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

    Example:
      >>> import jax.numpy as jnp
      >>> from iterjax.classical import marginal_error, sinkhorn
      >>> x = jnp.linspace(0.0, 1.0, 5)
      >>> cost, a = (x[:, None] - x[None, :]) ** 2, jnp.full(5, 0.2)
      >>> sol = sinkhorn(cost, a, a, 0.1, atol=1e-5)
      >>> bool(sol.converged), bool(marginal_error(cost, a, a, sol.value, 0.1) < 1e-4)
      (True, True)
    """
    cost, a, b = (jnp.asarray(x) for x in (cost, a, b))
    _check(cost, a, b, epsilon)
    eps = jnp.asarray(epsilon, cost.dtype)
    if h0 is None:
        h0 = jnp.zeros(cost.shape[1], cost.dtype)
    args = _Problem(cost, jnp.log(a), jnp.log(b), eps)
    sol = fixed_point(_sinkhorn_map, h0, args, solver=solver, **options)
    f = _f_potential(sol.value, *args)
    return dataclasses.replace(sol, value=Potentials(f, eps * sol.value))


class _Problem(NamedTuple):
    """The `args` of the Sinkhorn map (a type of its own, so that `SparseNewton`
    finds it inside whatever wrapping an adjoint gives the args)."""

    cost: jax.Array
    log_a: jax.Array
    log_b: jax.Array
    eps: jax.Array


def _find_problem(args):
    found = [
        x
        for x in jax.tree_util.tree_leaves(
            args, is_leaf=lambda x: isinstance(x, _Problem)
        )
        if isinstance(x, _Problem)
    ]
    if not found:
        raise TypeError("SparseNewton: solves `iterjax.classical.sinkhorn` only")
    return found[0]


class SparseNewtonState(NamedTuple):
    residual: Float[Array, " m"]  # T(h) - h
    products: Int[Array, ""]  # products with the sparsified Hessian so far


class SparseNewton(AbstractFixedPointSolver):
    """Newton steps on a sparsified Hessian, the step of Sinkhorn-Newton-Sparse
    (Tang et al. 2024), for `sinkhorn` only: it reads the problem from the
    `args` that `sinkhorn` passes.

    With f eliminated (P 1 = a), the column sums c(h) = Pᵀ1 of the plan have
    Jacobian S = diag(c) - Pᵀ diag(1/(P1)) P in h = g/ε (the Hessian of the
    dual in h). Away from its support the plan is tiny, so S is approximated by
    keeping, in every column of P, the `density` fraction of largest entries
    (P̃, with its own row and column sums), and the step solves
    S̃ d = b - c by CG (plus a constant on the mean, S's null space),
    h ← h + d. A product with S̃ costs O(nnz(P̃)) on a sparse backend; here P̃ is
    a masked dense array, so the saving is in the model, not yet in the time.

    Use it after a few Sinkhorn steps, and with a line search:
    `Switched(Picard(), Backtracking(SparseNewton(0.1)), after=20)`.
    `Solution.stats["products"]` counts the CG products.

    Attributes:
      density: the fraction of each column of P kept, in (0, 1].
      cg_rtol: CG's relative tolerance per step.
      cg_max_steps: CG's cap per step.
    """

    # density fixes how many entries are kept (a shape): static, not a leaf
    density: float = struct.field(pytree_node=False, default=0.1)
    cg_rtol: float = 1e-10
    cg_max_steps: int = struct.field(pytree_node=False, default=200)

    def __post_init__(self):
        check_range("SparseNewton", "density", self.density, 0.0, 1.0, lo_open=True)
        check_range("SparseNewton", "cg_rtol", self.cg_rtol, lo=0.0)

    def init(self, fn, y0, args):
        return SparseNewtonState(fn(y0, args) - y0, jnp.int32(0))

    def step(self, fn, h, args, state):
        problem = _find_problem(args)
        cost, log_a, log_b, eps = problem
        f = _f_potential(h, *problem)
        plan = jnp.exp(f[:, None] / eps + h[None, :] - cost / eps)
        keep = max(1, math.ceil(self.density * plan.shape[0]))
        kth = -jnp.sort(-plan, axis=0)[keep - 1]  # the keep-th largest per column
        sparse = jnp.where(plan >= kth[None, :], plan, 0.0)
        rows, cols = sparse.sum(1), sparse.sum(0)
        inv_rows = jnp.where(rows > 0, 1 / jnp.where(rows > 0, rows, 1), 0.0)
        scale = jnp.mean(cols)

        def hessian(v):  # S̃ v, plus scale · mean(v) on the constants
            return cols * v - sparse.T @ (inv_rows * (sparse @ v)) + scale * jnp.mean(v)

        rhs = jnp.exp(log_b) - plan.sum(0)
        cg = CG(rtol=self.cg_rtol, max_steps=self.cg_max_steps)
        d, stats = cg.solve_with_stats(hessian, rhs - jnp.mean(rhs))
        h = h + d
        h = h - jnp.mean(h)
        products = state.products + stats.num_matvecs
        return h, SparseNewtonState(fn(h, args) - h, products)

    def summary(self, state) -> dict:
        return {"products": state.products}


def transport_plan(cost, potentials, epsilon):
    """P_ij = exp((f_i + g_j - C_ij) / ε).

    Example:
      >>> import jax.numpy as jnp
      >>> from iterjax.classical import sinkhorn, transport_plan
      >>> cost, a = jnp.array([[0.0, 1.0], [1.0, 0.0]]), jnp.full(2, 0.5)
      >>> plan = transport_plan(cost, sinkhorn(cost, a, a, 0.1).value, 0.1)
      >>> [round(float(v), 3) for v in plan.sum(1)]  # its marginals are a
      [0.5, 0.5]
    """
    f, g = potentials
    return jnp.exp((f[:, None] + g[None, :] - cost) / epsilon)


def marginal_error(cost, a, b, potentials, epsilon):
    """‖P 1 - a‖₁ + ‖Pᵀ 1 - b‖₁ of the plan of `potentials`.

    Example:
      >>> import jax.numpy as jnp
      >>> from iterjax.classical import marginal_error, sinkhorn
      >>> cost, a = jnp.array([[0.0, 1.0], [1.0, 0.0]]), jnp.full(2, 0.5)
      >>> bool(marginal_error(cost, a, a, sinkhorn(cost, a, a, 0.1).value, 0.1) < 1e-4)
      True
    """
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
