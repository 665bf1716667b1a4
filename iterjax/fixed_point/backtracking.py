"""A backtracking line search on the residual or a loss, for any solver."""

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range, check_scalar_loss
from .._iterate import (
    AbstractFixedPointSolver,
    check_solver,
    nothing_spent,
    spend,
    state_at,
    with_spent,
)
from .._types import Array, Float, Int, PyTree, Y


class BacktrackingState(NamedTuple):
    residual: Y  # fn(y, args) - y
    inner: PyTree  # the wrapped solver's state
    merit: Float[Array, ""]  # φ(y): |r(y)|₂, or objective(y, args)
    shrinks: Int[Array, ""]  # step shrinks so far
    turns: Int[Array, ""]  # steps that took the residual, not the solver's step
    spent: dict  # the counts (`_iterate.counts`) of the inner states rebuilt


class Backtracking(AbstractFixedPointSolver):
    """Shortens the wrapped solver's step until a merit function falls enough.

    From y with residual r = f(y) - y the solver proposes y + d. The step taken is
    y + α d with the first α in 1, s, s², ... (s = `shrink`, at most
    `max_shrinks` times) for which the Armijo rule

        φ(y + α d) <= φ(y) + c α φ'         (c = `decrease`)

    holds, φ the merit function and φ' its slope along d:

    * φ = |r|₂ (default), φ' = -|r|₂, the slope along a Newton direction
      d = -r'(y)⁻¹ r(y): damped Newton converges from far starts where full
      steps diverge (Dennis & Schnabel 1996, §6.3; the line search of
      Sinkhorn-Newton, Tang et al. 2024);
    * φ = `objective`, a loss L(y) whose fixed-point map f is gradient
      descent's, f(y) = y - ∇L(y) (as in `argmin`), so r = -∇L and
      φ' = ∇Lᵀd = -⟨r, d⟩: the loss must fall, as in any line-search minimiser
      (Nocedal & Wright 2006, §3.1). A step that is not a descent direction
      (φ' >= 0, or not finite) is replaced by the residual itself, d = r = -∇L
      (a gradient step; `stats["turns"]` counts them). With Newton-CG that
      truncates at negative curvature (`Newton(CG(indefinite="truncate"))`)
      this is line-search Newton-CG (Nocedal & Wright Algorithm 7.1), which
      descends from a saddle or a region of negative curvature instead of
      breaking down there, and does not climb to a maximum as |∇L| could.

    A trial whose merit is NaN fails the rule (it shrinks the step). After a
    shortened or replaced step the solver restarts at the new point
    (`state_at`).

    Each trial costs one evaluation of φ (f, or the objective, which is also
    evaluated once at the full step), and a shortened step one more of f (at
    the accepted point, so that it is differentiated; under `vmap` every lane
    pays it, as both branches of a `lax.cond` run). The search is a
    `lax.while_loop` whose result α is not differentiated: with
    `UnrolledAdjoint` the gradient flows through y + α d and the evaluation
    there, as for a fixed α.

    Attributes:
      solver: the wrapped solver.
      shrink: s in (0, 1).
      max_shrinks: the most shrinks per step (>= 1); the last trial is taken
        whether or not it satisfies the rule.
      decrease: c in [0, 1).
      objective: None (the merit is |r|₂), or `L(y) -> scalar` with
        f(y, args) = y - ∇L(y) (a closure over the args, which may be traced:
        its values are never differentiated).

    `Solution.stats["shrinks"]` counts the trials beyond the first.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> f = lambda z, a: z - jnp.arctan(z - a)  # root a; full Newton steps overshoot
      >>> z0 = jnp.full((), 3.0)
      >>> newton = iterjax.fixed_point(f, z0, 0.0, solver=iterjax.Newton())
      >>> solver = iterjax.Backtracking(iterjax.Newton())
      >>> sol = iterjax.fixed_point(f, z0, 0.0, solver=solver)
      >>> bool(newton.converged), bool(sol.converged), abs(float(sol.value)) < 1e-6
      (False, True, True)
    """

    solver: AbstractFixedPointSolver
    shrink: float = 0.5
    max_shrinks: int = struct.field(pytree_node=False, default=10)
    decrease: float = 1e-4
    objective: Callable | None = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        check_solver("Backtracking", self.solver)
        check_range("Backtracking", "shrink", self.shrink, 0.0, 1.0, True, True)
        check_int("Backtracking", "max_shrinks", self.max_shrinks, 1)
        check_range("Backtracking", "decrease", self.decrease, 0.0, 1.0, False, True)
        if self.objective is not None and not callable(self.objective):
            raise TypeError(
                "Backtracking: `objective` must be None or callable, "
                f"got {type(self.objective).__name__}"
            )

    def init(self, fn, y0, args):
        inner = self.solver.init(fn, y0, args)
        if self.objective is not None:
            loss = lambda y, _: self.objective(y)
            check_scalar_loss("Backtracking", "objective", loss, y0, None)
        merit = self._merit(fn, y0, args, inner.residual)
        spent = nothing_spent(self.solver, inner)
        zero = jnp.int32(0)
        return BacktrackingState(inner.residual, inner, merit, zero, zero, spent)

    def _merit(self, fn, y, args, residual=None):
        """φ(y) (in the dtype of |y|₂; not differentiated); `residual`: r(y),
        when known."""
        if self.objective is not None:
            dtype = jax.eval_shape(tu.two_norm, y).dtype
            merit = jnp.asarray(self.objective(y)).astype(dtype)
        else:
            if residual is None:
                residual = tu.tree_sub(fn(y, args), y)
            merit = tu.two_norm(residual)
        return jax.lax.stop_gradient(merit)

    def step(self, fn, y, args, state):
        y_full, inner = self.solver.step(fn, y, args, state.inner)
        d = tu.tree_sub(y_full, y)
        r = state.residual
        if self.objective is None:
            turn = jnp.array(False)
            slope = -tu.two_norm(r)
            first = jax.lax.stop_gradient(tu.two_norm(inner.residual))
        else:
            slope = -tu.tree_vdot(r, d)
            turn = ~(slope < 0)  # not a descent direction (or NaN): d = r
            d = tu.tree_where(turn, r, d)
            slope = jnp.where(turn, -tu.tree_vdot(r, r), slope)
            full = tu.tree_where(turn, tu.tree_add(y, r), y_full)  # y + d, exactly
            first = self._merit(fn, full, args)
        frozen = jax.lax.stop_gradient((y, d, args, state.merit, slope))

        def too_long(c):
            alpha, merit, k = c
            bound = frozen[3] + self.decrease * alpha * frozen[4]
            return ~(merit <= bound) & (k < self.max_shrinks)

        def shorter(c):
            alpha, _, k = c
            alpha = alpha * self.shrink
            y_t = tu.tree_axpy(alpha, frozen[1], frozen[0])
            return alpha, self._merit(fn, y_t, frozen[2]), k + 1

        one = jnp.ones((), state.merit.dtype)
        alpha, merit, k = jax.lax.while_loop(
            too_long, shorter, (one, first, jnp.int32(0))
        )

        def restarted(_):
            y_new = tu.tree_axpy(alpha, d, y)
            residual = tu.tree_sub(fn(y_new, args), y_new)
            return y_new, state_at(self.solver, y_new, residual, args)

        rebuilt = (k > 0) | turn
        spent = spend(state.spent, self.solver, inner, rebuilt)
        y_new, inner = jax.lax.cond(rebuilt, restarted, lambda _: (y_full, inner), None)
        return y_new, BacktrackingState(
            inner.residual,
            inner,
            merit,
            state.shrinks + k,
            state.turns + turn.astype(jnp.int32),
            spent,
        )

    def summary(self, state) -> dict:
        summary = with_spent(self.solver.summary(state.inner), state.spent)
        summary = {**summary, "shrinks": state.shrinks}
        if self.objective is not None:
            summary["turns"] = state.turns
        return summary

    def displacement(self, y, y0, num_steps, state):
        return self.solver.displacement(y, y0, num_steps, state.inner)
