"""An optax optimiser as a fixed-point solver (for `argmin` and `root`)."""

from typing import Any, NamedTuple

import optax

from .. import _struct as struct
from .. import _tree as tu
from .._iterate import AbstractFixedPointSolver
from .._optax import optax_init, optax_step
from .._types import Y


class OptaxState(NamedTuple):
    residual: Y  # fn(y, args) - y
    opt_state: Any


class OptaxSolver(AbstractFixedPointSolver):
    """Let an optax optimiser take the steps: y ← y + update(-(f(y) - y)).

    The residual r = f(y) - y is handed to the optimiser as a negative gradient.
    In `iterjax.argmin` (and `root` of a gradient) r = -∇g(y), so this is plain
    optax training of the inner problem, stopping when |∇g| <= atol; with
    `optax.sgd(β)` on a general map it is Picard iteration with damping β. One
    function evaluation per step.

    Attributes:
      optimizer: an `optax.GradientTransformation` (e.g. `optax.adam(1e-2)`).

    Examples:
      >>> import jax.numpy as jnp, optax, iterjax
      >>> sol = iterjax.argmin(lambda w, t: jnp.sum((w - t) ** 2), jnp.zeros(2),
      ...                      jnp.array([1.0, 2.0]),
      ...                      solver=iterjax.OptaxSolver(optax.sgd(0.25)), atol=1e-8)
      >>> [round(float(v), 6) for v in sol.value]
      [1.0, 2.0]
    """

    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)

    def __post_init__(self):
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError(
                "OptaxSolver: `optimizer` must be an optax.GradientTransformation, "
                f"got {type(self.optimizer).__name__}"
            )

    def init(self, fn, y0, args):
        opt_state = optax_init(self.optimizer, y0)
        return OptaxState(tu.tree_sub(fn(y0, args), y0), opt_state)

    def step(self, fn, y, args, state):
        grad = tu.tree_map(lambda r: -r, state.residual)
        y, opt_state = optax_step(self.optimizer, grad, state.opt_state, y)
        return y, OptaxState(tu.tree_sub(fn(y, args), y), opt_state)
