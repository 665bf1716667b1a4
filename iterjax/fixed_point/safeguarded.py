"""A residual-decrease safeguard with a Picard fallback, for any solver."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _tree as tu
from .._checks import check_range
from .._iterate import (
    AbstractFixedPointSolver,
    check_solver,
    nothing_spent,
    spend,
    state_at,
    with_spent,
)
from .._types import Array, Int, PyTree, Y


class SafeguardedState(NamedTuple):
    residual: Y  # fn(y, args) - y
    inner: PyTree  # the wrapped solver's state
    fallbacks: Int[Array, ""]  # Picard steps taken instead
    spent: dict  # the counts (`_iterate.counts`) of the inner states rejected


class Safeguarded(AbstractFixedPointSolver):
    """Accepts the wrapped solver's step only if the residual does not grow.

    From y with r = f(y) - y, the solver proposes y' with r' = f(y') - y'. If
    |r'| <= growth · |r| (two-norms) it is taken; otherwise the iteration takes
    the Picard step y' = f(y) = y + r instead, evaluates f there, and restarts
    the wrapped solver at that point. For a contraction the Picard step shrinks
    the residual, so a safeguarded accelerator (Anderson, Broyden) converges
    wherever Picard does, in the spirit of the safeguards of Zhang, O'Donoghue &
    Boyd (2020), "Globally convergent type-I Anderson acceleration".

    A fallback costs one more f evaluation. Under `jit` it runs only when needed
    (`lax.cond`); under `vmap` JAX evaluates both branches for every lane.
    `Solution.stats["fallbacks"]` counts them, per lane.

    Attributes:
      solver: the wrapped solver.
      growth: the largest accepted ratio |r'| / |r|, >= 1.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> solver = iterjax.Safeguarded(iterjax.Anderson(5))
      >>> sol = iterjax.fixed_point(lambda y, a: jnp.cos(y), jnp.array(1.0),
      ...                           solver=solver, atol=1e-10)
      >>> round(float(sol.value), 6)
      0.739085
    """

    solver: AbstractFixedPointSolver
    growth: float = 1.0

    def __post_init__(self):
        check_solver("Safeguarded", self.solver)
        check_range("Safeguarded", "growth", self.growth, lo=1.0)

    def init(self, fn, y0, args):
        inner = self.solver.init(fn, y0, args)
        spent = nothing_spent(self.solver, inner)
        return SafeguardedState(inner.residual, inner, jnp.int32(0), spent)

    def step(self, fn, y, args, state):
        y_new, inner = self.solver.step(fn, y, args, state.inner)
        norm, new_norm = tu.two_norm(state.residual), tu.two_norm(inner.residual)
        accept = new_norm <= self.growth * norm

        def picard(_):
            y_p = tu.tree_add(y, state.residual)
            r_p = tu.tree_sub(fn(y_p, args), y_p)
            return y_p, state_at(self.solver, y_p, r_p, args)

        spent = spend(state.spent, self.solver, inner, ~accept)
        y_new, inner = jax.lax.cond(accept, lambda _: (y_new, inner), picard, None)
        fallbacks = state.fallbacks + (~accept).astype(jnp.int32)
        return y_new, SafeguardedState(inner.residual, inner, fallbacks, spent)

    def summary(self, state) -> dict:
        summary = with_spent(self.solver.summary(state.inner), state.spent)
        return {**summary, "fallbacks": state.fallbacks}

    def displacement(self, y, y0, num_steps, state):
        return self.solver.displacement(y, y0, num_steps, state.inner)
