"""A backtracking line search on the residual, for any solver."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from .._iterate import (
    AbstractFixedPointSolver,
    check_solver,
    nothing_spent,
    spend,
    state_at,
    with_spent,
)
from .._types import Array, Int, PyTree, Y


class BacktrackingState(NamedTuple):
    residual: Y  # fn(y, args) - y
    inner: PyTree  # the wrapped solver's state
    shrinks: Int[Array, ""]  # step shrinks so far
    spent: dict  # the counts (`_iterate.counts`) of the inner states rebuilt


class Backtracking(AbstractFixedPointSolver):
    """Shortens the wrapped solver's step until the residual falls enough.

    From y with residual r = f(y) - y the solver proposes y + d. The step taken is
    y + α d with the first α in 1, s, s², ... (s = `shrink`, at most
    `max_shrinks` times) for which

        |r(y + α d)|₂ <= (1 - c α) |r(y)|₂          (c = `decrease`),

    the Armijo rule on the merit function |r|₂. A Newton direction
    d = -r'(y)⁻¹ r(y) is a descent direction for it, so damped Newton converges
    from far starts where full steps diverge (Dennis & Schnabel 1996, §6.3; the
    line search of Sinkhorn-Newton, Tang et al. 2024). After a shortened step the
    solver restarts at the new point (`state_at`).

    Each trial costs one evaluation of f, and a shortened step one more (at the
    accepted point, so that it is differentiated; under `vmap` every lane pays
    it, as both branches of a `lax.cond` run). The search is a `lax.while_loop` whose
    result α is not differentiated: with `UnrolledAdjoint` the gradient flows
    through y + α d and the evaluation there, as for a fixed α.

    Attributes:
      solver: the wrapped solver.
      shrink: s in (0, 1).
      max_shrinks: the most shrinks per step (>= 1); the last trial is taken
        whether or not it satisfies the rule.
      decrease: c in [0, 1).

    `Solution.stats["shrinks"]` counts the trials beyond the first.
    """

    solver: AbstractFixedPointSolver
    shrink: float = 0.5
    max_shrinks: int = struct.field(pytree_node=False, default=10)
    decrease: float = 1e-4

    def __post_init__(self):
        check_solver("Backtracking", self.solver)
        check_range("Backtracking", "shrink", self.shrink, 0.0, 1.0, True, True)
        check_int("Backtracking", "max_shrinks", self.max_shrinks, 1)
        check_range("Backtracking", "decrease", self.decrease, 0.0, 1.0, False, True)

    def init(self, fn, y0, args):
        inner = self.solver.init(fn, y0, args)
        spent = nothing_spent(self.solver, inner)
        return BacktrackingState(inner.residual, inner, jnp.int32(0), spent)

    def step(self, fn, y, args, state):
        y_full, inner = self.solver.step(fn, y, args, state.inner)
        d = tu.tree_sub(y_full, y)
        norm = tu.two_norm(state.residual)
        frozen = jax.lax.stop_gradient((y, d, args, norm, inner.residual))

        def too_long(c):
            alpha, residual, k = c
            bound = (1 - self.decrease * alpha) * frozen[3]
            return (tu.two_norm(residual) > bound) & (k < self.max_shrinks)

        def shorter(c):
            alpha, _, k = c
            alpha = alpha * self.shrink
            y_t = tu.tree_axpy(alpha, frozen[1], frozen[0])
            return alpha, tu.tree_sub(fn(y_t, frozen[2]), y_t), k + 1

        one = jnp.ones((), norm.dtype)
        alpha, _, k = jax.lax.while_loop(
            too_long, shorter, (one, frozen[4], jnp.int32(0))
        )

        def shortened(_):
            y_new = tu.tree_axpy(alpha, d, y)
            residual = tu.tree_sub(fn(y_new, args), y_new)
            return y_new, state_at(self.solver, y_new, residual, args)

        spent = spend(state.spent, self.solver, inner, k > 0)
        y_new, inner = jax.lax.cond(k > 0, shortened, lambda _: (y_full, inner), None)
        shrinks = state.shrinks + k
        return y_new, BacktrackingState(inner.residual, inner, shrinks, spent)

    def summary(self, state) -> dict:
        summary = with_spent(self.solver.summary(state.inner), state.spent)
        return {**summary, "shrinks": state.shrinks}

    def displacement(self, y, y0, num_steps, state):
        return self.solver.displacement(y, y0, num_steps, state.inner)
