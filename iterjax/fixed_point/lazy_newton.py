"""Newton's method with a dense Jacobian reused for several steps (lazy Jacobians)."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int
from .._iterate import AbstractFixedPointSolver
from .._types import Array, Float, Int, Y
from ._flat import ravel


class LazyNewtonState(NamedTuple):
    residual: Y  # g(y) = fn(y, args) - y
    lu: Float[Array, "n n"]  # LU factors of g' at the last linearisation point
    pivots: Int[Array, " n"]
    steps: Int[Array, ""]
    jacobians: Int[Array, ""]  # Jacobians computed (n JVPs each)


class LazyNewton(AbstractFixedPointSolver):
    """Newton's method on g(y) = f(y) - y with the Jacobian refreshed every d steps.

        J = g'(y_j) at steps j = 0, d, 2d, ...
        solve  -J s = g(y_k),   y_{k+1} = y_k + s

    The Jacobian is formed densely (n forward-mode JVPs, `jax.jacfwd`) and
    LU-factorised once per refresh; the steps in between cost one function
    evaluation and two triangular solves. d = 1 is dense Newton (quadratic); d > 1
    is Shamanskii's method (order d + 1 per Jacobian in theory; Doikov, Chayti &
    Jaggi 2023, "Second-order optimization with lazy Hessians", for the arithmetic
    saving of about a factor d). For large n prefer the matrix-free `Newton`.

    `Solution.stats["jacobians"]` counts the Jacobians computed. Under `vmap` both
    branches of the refresh run, so the saving shows only unbatched.

    Attributes:
      jacobian_every: d >= 1.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> sol = iterjax.root(lambda y, a: y**3 - a, jnp.array([1.0]), 8.0,
      ...                    solver=iterjax.LazyNewton(3), atol=1e-12)
      >>> round(float(sol.value[0]), 8)
      2.0
      >>> int(sol.stats["jacobians"]) < int(sol.num_steps)
      True
    """

    jacobian_every: int = struct.field(pytree_node=False, default=2)

    def __post_init__(self):
        check_int("LazyNewton", "jacobian_every", self.jacobian_every, 1)

    def init(self, fn, y0, args):
        residual = tu.tree_sub(fn(y0, args), y0)
        flat, _ = ravel(residual)
        n = flat.shape[0]
        lu = jnp.zeros((n, n), flat.dtype)
        zero = jnp.int32(0)
        return LazyNewtonState(residual, lu, jnp.zeros(n, jnp.int32), zero, zero)

    def step(self, fn, y, args, state):
        y_flat, unravel = ravel(y)
        g = lambda v: ravel(tu.tree_sub(fn(unravel(v), args), unravel(v)))[0]
        fresh = (state.steps % self.jacobian_every) == 0

        def factor():
            return jax.scipy.linalg.lu_factor(jax.jacfwd(g)(y_flat))

        lu, pivots = jax.lax.cond(fresh, factor, lambda: (state.lu, state.pivots))
        r_flat, _ = ravel(state.residual)
        step = jax.scipy.linalg.lu_solve((lu, pivots), -r_flat)
        y = unravel(y_flat + step)
        residual = tu.tree_sub(fn(y, args), y)
        return y, LazyNewtonState(
            residual,
            lu,
            pivots,
            state.steps + 1,
            state.jacobians + fresh.astype(jnp.int32),
        )

    def summary(self, state) -> dict:
        return {"jacobians": state.jacobians}
