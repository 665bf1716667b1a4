"""Adaptive restarts: a rule, and the wrapper that applies it to any solver."""

from typing import NamedTuple

import jax.numpy as jnp

from .. import _struct as struct
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
from .._types import Array, Float, Int, PyTree, Y


class RestartRule(struct.PyTreeNode):
    """When to restart an iteration, from its residual norms (Lu & Yang 2024,
    "Restarted Halpern PDHG for linear programming"; the rules of cuPDLP-x).

    With r the residual norm now, r_a at the last restart and r_- one step ago,
    restart after k >= 1 steps of the current epoch (n steps in all) when

        r <= sufficient_decay · r_a                      (it fell enough), or
        r <= necessary_decay · r_a  and  r > r_-         (it fell, then stalled), or
        k >= artificial · n                              (the epoch is long).

    The last rule bounds the number of restarts by O(log n), so that a sublinear
    method keeps its rate; the first two make it linear where the problem is sharp.

    Attributes:
      sufficient_decay, necessary_decay, artificial: factors in (0, 1), with
        sufficient_decay <= necessary_decay.
    """

    sufficient_decay: float = 0.2
    necessary_decay: float = 0.8
    artificial: float = 0.36

    def __post_init__(self):
        for name in ("sufficient_decay", "necessary_decay", "artificial"):
            check_range("RestartRule", name, getattr(self, name), 0.0, 1.0, True, True)
        low, high = self.sufficient_decay, self.necessary_decay
        if isinstance(low, float) and isinstance(high, float) and low > high:
            raise ValueError(
                "RestartRule: `sufficient_decay` must not exceed `necessary_decay`, "
                f"got {low} > {high}"
            )

    def __call__(self, norm, anchor_norm, last_norm, count, steps):
        """Whether to restart (a bool array) at residual norm `norm`."""
        real = norm.dtype
        return (count > 0) & (
            (norm <= self.sufficient_decay * anchor_norm)
            | ((norm <= self.necessary_decay * anchor_norm) & (norm > last_norm))
            | (count.astype(real) >= self.artificial * steps.astype(real))
        )


class RestartedState(NamedTuple):
    residual: Y  # fn(y, args) - y
    inner: PyTree  # the wrapped solver's state
    anchor_norm: Float[Array, ""]  # |fn(y) - y| at the last restart
    last_norm: Float[Array, ""]  # |fn(y) - y| one step ago
    epoch: Int[Array, ""]  # steps since the last restart
    steps: Int[Array, ""]
    restarts: Int[Array, ""]
    spent: dict  # the counts (`_iterate.counts`) of the inner states restarted away


class Restarted(AbstractFixedPointSolver):
    """Any solver, restarted from its current iterate when `rule` says so.

    A restart rebuilds the wrapped solver's state at the current iterate, as if
    the solve began there: Anderson and Broyden forget their history, Halpern
    moves its anchor. It costs no function evaluation (the residual there is
    known). Norms are two-norms. `Solution.stats["restarts"]` counts them.

    Attributes:
      solver: the wrapped solver.
      rule: a `RestartRule`.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> solver = iterjax.Restarted(iterjax.Anderson(5))
      >>> sol = iterjax.fixed_point(lambda y, a: jnp.cos(y), jnp.array(1.0),
      ...                           solver=solver, atol=1e-10)
      >>> round(float(sol.value), 6)
      0.739085
    """

    solver: AbstractFixedPointSolver
    rule: RestartRule = RestartRule()

    def __post_init__(self):
        check_solver("Restarted", self.solver)

    def init(self, fn, y0, args):
        inner = self.solver.init(fn, y0, args)
        norm = tu.two_norm(inner.residual)
        zero = jnp.int32(0)
        spent = nothing_spent(self.solver, inner)
        return RestartedState(
            inner.residual, inner, norm, norm, zero, zero, zero, spent
        )

    def step(self, fn, y, args, state):
        y, inner = self.solver.step(fn, y, args, state.inner)
        norm = tu.two_norm(inner.residual)
        count, steps = state.epoch + 1, state.steps + 1
        restart = self.rule(norm, state.anchor_norm, state.last_norm, count, steps)
        fresh = state_at(self.solver, y, inner.residual, args)
        spent = spend(state.spent, self.solver, inner, restart)
        inner = tu.tree_where(restart, fresh, inner)
        return y, RestartedState(
            inner.residual,
            inner,
            jnp.where(restart, norm, state.anchor_norm),
            norm,
            jnp.where(restart, 0, count),
            steps,
            state.restarts + restart.astype(jnp.int32),
            spent,
        )

    def summary(self, state) -> dict:
        summary = with_spent(self.solver.summary(state.inner), state.spent)
        return {**summary, "restarts": state.restarts}

    def displacement(self, y, y0, num_steps, state):
        return self.solver.displacement(y, y0, num_steps, state.inner)
