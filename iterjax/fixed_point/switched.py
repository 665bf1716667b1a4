"""Two solvers in sequence: a cheap one to get close, a fast one to finish."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from .._iterate import (
    AbstractFixedPointSolver,
    check_solver,
    counts,
    state_at,
    with_spent,
)
from .._types import Array, Int, PyTree, Y


class SwitchedState(NamedTuple):
    residual: Y  # fn(y, args) - y
    first: PyTree  # the first solver's state
    then: PyTree  # the second solver's state (rebuilt at y until the switch)
    switched_at: Int[Array, ""]  # the step of the switch, -1 before
    taken: Int[Array, ""]  # steps taken


class Switched(AbstractFixedPointSolver):
    """Runs `first` until it has taken `after` steps or its residual two-norm is
    at most `below`, then `then` from where it stopped, for good.

    The classical use is a globally convergent but slow iteration followed by a
    locally fast one: Sinkhorn steps, then Newton steps (Sinkhorn-Newton, Tang
    et al. 2024, "Accelerating Sinkhorn algorithm with sparse Newton
    iterations"), or Picard then Anderson. At the switch the second solver's
    state is built from the known residual (`state_at`): no extra evaluation.

    The choice between the two steps is a `lax.cond`: under `jit` only one runs
    per step; under `vmap` JAX evaluates both for every lane, so a batched run
    pays for both solvers' steps.

    Attributes:
      first, then: the two solvers.
      after: the most steps `first` takes (>= 0).
      below: switch as soon as the residual two-norm is at most this (>= 0;
        0 switches on `after` alone).

    `Solution.stats` holds the second solver's summary (its counts, such as
    "jvps", include the first solver's) and `switched_at`, the step at which it
    took over (-1 if it never did).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> f = lambda z, a: jnp.cos(a * z)
      >>> solver = iterjax.Switched(iterjax.Picard(), iterjax.Newton(), after=3)
      >>> sol = iterjax.fixed_point(f, jnp.zeros(()), 1.0, solver=solver)
      >>> bool(sol.converged), int(sol.stats["switched_at"])
      (True, 3)
    """

    first: AbstractFixedPointSolver
    then: AbstractFixedPointSolver
    after: int = struct.field(pytree_node=False, default=10)
    below: float = 0.0

    def __post_init__(self):
        check_solver("Switched", self.first, "first")
        check_solver("Switched", self.then, "then")
        check_int("Switched", "after", self.after, 0)
        check_range("Switched", "below", self.below, lo=0.0)

    def _switch(self, residual, count):
        return (count >= self.after) | (tu.two_norm(residual) <= self.below)

    def init(self, fn, y0, args):
        first = self.first.init(fn, y0, args)
        then = state_at(self.then, y0, first.residual, args)
        count = jnp.int32(0)
        switched_at = jnp.where(self._switch(first.residual, count), 0, -1)
        return SwitchedState(first.residual, first, then, switched_at, count)

    def step(self, fn, y, args, state):
        def run_first(_):
            y_new, first = self.first.step(fn, y, args, state.first)
            then = state_at(self.then, y_new, first.residual, args)
            return y_new, first.residual, first, then

        def run_then(_):
            y_new, then = self.then.step(fn, y, args, state.then)
            return y_new, then.residual, state.first, then

        y_new, residual, first, then = jax.lax.cond(
            state.switched_at >= 0, run_then, run_first, None
        )
        count = state.taken + 1
        switch = (state.switched_at < 0) & self._switch(residual, count)
        switched_at = jnp.where(switch, count, state.switched_at).astype(jnp.int32)
        return y_new, SwitchedState(residual, first, then, switched_at, count)

    def summary(self, state) -> dict:
        # the counts of both phases add up
        first = counts(self.first, state.first)
        summary = with_spent(self.then.summary(state.then), first)
        return {**summary, "switched_at": state.switched_at}
