"""The result of every iterative solve."""

import jax
import jax.numpy as jnp
import numpy as np

from . import _struct as struct
from ._types import Array, Bool, Float, Int, Y

# Result codes carried as int32 arrays so that they survive jit and vmap.
SUCCESSFUL = 0
MAX_STEPS_REACHED = 1
NONFINITE = 2
NONFINITE_LOSS = 3
INVALID_TOLERANCE = 4
NOT_A_MINIMUM = 5

MESSAGES = {
    SUCCESSFUL: "converged",
    MAX_STEPS_REACHED: (
        "did not converge: max_steps was reached before the residual fell below "
        "atol + rtol * |y|; raise max_steps, loosen the tolerances or try another "
        "solver"
    ),
    NONFINITE: (
        "diverged: the iterate or its residual became non-finite (inf or NaN); "
        "the map may not be contractive, try damping or another solver"
    ),
    NONFINITE_LOSS: (
        "did not converge: the gradient vanished at a point where the loss itself "
        "is not finite (NaN or inf); the minimiser there is not valid"
    ),
    INVALID_TOLERANCE: (
        "was not run: atol or rtol is negative or NaN (a traced value, so it could "
        "not be refused at trace time); pass tolerances >= 0"
    ),
    NOT_A_MINIMUM: (
        "found a stationary point that is not a minimum: the loss curves downward "
        "along some direction there (a saddle point or a maximum; "
        "`Solution.stats['curvature']` is the lowest curvature seen). The implicit "
        "gradient assumes a minimum and is not valid there; start elsewhere, or "
        "make the inner loss convex near its minimiser (e.g. a ridge term)"
    ),
}


class NonConvergenceError(RuntimeError):
    """Raised by `throw=True` solves and `Solution.raise_if_failed`."""


@struct.dataclass
class Solution:
    """What an iterative solve returns.

    Attributes:
      value: the final iterate, a pytree like `y0`.
      converged: bool array, `True` when the stopping rule was met.
      num_steps: int array, the number of solver steps taken (function evaluations
        are `num_steps + 1` for Picard, Anderson, Broyden and Halpern).
      residual: the norm (default: infinity norm) of `fn(value) - value` (fixed
        points) or of `F(value)` (roots).
      result: int32 code: 0 converged, 1 max_steps reached, 2 non-finite, 3 a
        non-finite loss at a stationary point (`argmin`), 4 a traced
        tolerance that is negative or NaN (nothing was solved), 5 a stationary
        point that is not a minimum (`argmin`).
      trace: residual norms after each step, shape `[max_steps]`, NaN after the solve
        stopped; `None` unless `trace=True` was passed.
      stats: solver-specific extras (e.g. `max_steps`).
      displacement: the estimate of the infimal displacement vector v, a pytree
        like `value`: the direction and step in which the iterates drift when
        the map has no fixed point (e.g. an infeasible problem); near 0 when it
        has one. The solver's own estimate: (y_k - y_0) / k by default, the
        residual for `Halpern` (Park & Ryu's accelerated estimate).
      drifting: bool array, `True` when the solve did not converge and the
        iterates drift along `displacement` (see `message`).
    """

    value: Y
    converged: Bool[Array, "*batch"]
    num_steps: Int[Array, "*batch"]
    residual: Float[Array, "*batch"]
    result: Int[Array, "*batch"]
    trace: Float[Array, "*batch max_steps"] | None = None
    stats: dict = struct.field(default_factory=dict)
    displacement: Y = None
    drifting: Bool[Array, "*batch"] | None = None

    @property
    def message(self) -> str:
        """A human-readable description of `result` (concrete results only)."""
        codes = np.unique(np.asarray(self.result))
        text = "; ".join(MESSAGES[int(c)] for c in codes)
        if self.drifting is not None and np.any(np.asarray(self.drifting)):
            text += (
                "; the iterates drift along `Solution.displacement` without a "
                "falling residual: the map may have no fixed point (an "
                "infeasible problem), or one too far to reach in max_steps"
            )
        return text

    def raise_if_failed(self) -> "Solution":
        """Raise `NonConvergenceError` unless every (batch) element converged."""
        _raise_on_codes(np.asarray(self.result), "solve")
        return self


def _raise_on_codes(codes, what):
    bad = codes[codes != SUCCESSFUL]
    if bad.size:
        n = bad.size
        detail = MESSAGES[int(bad.flat[0])]
        where = f" ({n} of {codes.size} batch elements)" if codes.size > 1 else ""
        raise NonConvergenceError(f"iterjax: {what} {detail}{where}")


def error_if_failed(result: jax.Array, what: str) -> None:
    """Raise on failure: at once when `result` is concrete, else from the device.

    Under `jit` the error surfaces as a `JaxRuntimeError` whose message contains the
    `NonConvergenceError` text.
    """
    if isinstance(result, jax.core.Tracer):
        jax.debug.callback(lambda c: _raise_on_codes(np.asarray(c), what), result)
    else:
        _raise_on_codes(np.asarray(result), what)


def result_code(converged, finite):
    return jnp.where(
        converged,
        jnp.int32(SUCCESSFUL),
        jnp.where(finite, jnp.int32(MAX_STEPS_REACHED), jnp.int32(NONFINITE)),
    )
