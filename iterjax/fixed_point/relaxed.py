"""Krasnosel'skii-Mann relaxation of the map, for any solver."""

from typing import NamedTuple

from .. import _tree as tu
from .._checks import check_range
from .._iterate import AbstractFixedPointSolver, check_solver
from .._types import PyTree, Y


class RelaxedState(NamedTuple):
    residual: Y  # fn(y, args) - y
    inner: PyTree  # the wrapped solver's state on the relaxed map


class Relaxed(AbstractFixedPointSolver):
    """Runs `solver` on the relaxed map f_ω = (1 - ω) I + ω f.

        f_ω(y) - y = ω (f(y) - y)

    f_ω has the fixed points of f. For ω in (0, 1) it is averaged when f is
    nonexpansive, so that Picard on it (the Krasnosel'skii-Mann iteration)
    converges where Picard on f may cycle; ω in (1, 2) over-relaxes a
    contraction whose Jacobian's spectrum is real and positive. The stopping rule
    and `Solution.residual` still measure f(y) - y.

    Attributes:
      solver: the wrapped solver.
      relaxation: ω in (0, 2).

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> rotation = lambda y, a: jnp.stack([-y[1], y[0]])  # Picard cycles
      >>> solver = iterjax.Relaxed(iterjax.Picard(), 0.5)
      >>> sol = iterjax.fixed_point(rotation, jnp.ones(2), solver=solver)
      >>> bool(sol.converged)
      True
    """

    solver: AbstractFixedPointSolver
    relaxation: float = 0.5

    def __post_init__(self):
        check_solver("Relaxed", self.solver)
        check_range("Relaxed", "relaxation", self.relaxation, 0.0, 2.0, True, True)

    def _relaxed(self, fn):
        return lambda y, args: tu.tree_axpy(
            self.relaxation, tu.tree_sub(fn(y, args), y), y
        )

    def _state(self, inner):
        return RelaxedState(tu.tree_scale(1 / self.relaxation, inner.residual), inner)

    def init(self, fn, y0, args):
        return self._state(self.solver.init(self._relaxed(fn), y0, args))

    def lazy_init(self, y0):
        inner = self.solver.lazy_init(y0)
        return None if inner is None else RelaxedState(inner.residual, inner)

    def step(self, fn, y, args, state):
        y, inner = self.solver.step(self._relaxed(fn), y, args, state.inner)
        return y, self._state(inner)

    def summary(self, state) -> dict:
        return self.solver.summary(state.inner)

    def displacement(self, y, y0, num_steps, state):
        v = self.solver.displacement(y, y0, num_steps, state.inner)
        return tu.tree_scale(1 / self.relaxation, v)  # f_ω drifts by ω v
