"""A chain of related fixed-point problems, each warm-started from the last."""

from collections.abc import Callable
from typing import Any

import jax

from .. import _tree as tu
from .._iterate import AbstractFixedPointSolver
from .._solution import Solution
from .._types import Args, ArrayLike, Norm, PyTree, Y
from ..implicit import AbstractAdjoint, ImplicitAdjoint
from ._api import fixed_point
from .anderson import Anderson


def fixed_point_chain(
    fn: Callable[[Any, Any, Any], Any],
    y0: Y,
    xs: PyTree[ArrayLike],
    args: Args = None,
    *,
    warm_start: bool = True,
    solver: AbstractFixedPointSolver = Anderson(),
    atol: float = 1e-6,
    rtol: float = 0.0,
    max_steps: int = 256,
    adjoint: AbstractAdjoint = ImplicitAdjoint(),
    throw: bool = False,
    norm: Norm = tu.max_abs,
) -> Solution:
    """Solve y_t = fn(y_t, args, x_t) for every x_t in `xs`, in order, in a `lax.scan`.

    Problem t starts from the solution of problem t - 1 (`warm_start=True`, the
    default) or from `y0`. Related problems, e.g. a DEQ layer applied along a
    diffusion sampler's timesteps (Fixed Point Diffusion Models) or a parameter
    continuation, then need far fewer iterations (`warmstart_sequence`: 2.6-3.8x
    fewer in total). With only a few `max_steps` per problem it is the
    real-time iteration scheme (Diehl et al.; Real-Time Iteration for diffusion
    policies): each problem is solved approximately, from the last one's answer.

    Gradients flow to `args` and `xs` through each problem's `adjoint`. With the
    default `ImplicitAdjoint` a converged solution does not depend on where its
    solve started, so the chain's gradient is the sum of the problems' implicit
    gradients, at the memory of one; `UnrolledAdjoint()` also differentiates
    through the warm starts (what the real-time iteration needs).

    Args:
      fn: `fn(y, args, x) -> y`-like pytree.
      y0: the first problem's initial guess (and every problem's, when cold).
      xs: a pytree whose leaves have a leading axis T: the problems' inputs.
      args: parameters shared by all problems.
      warm_start: start each problem from the previous solution.
      Others: as in `fixed_point`, applied to each problem.

    Returns:
      A `Solution` whose fields have a leading axis T: `value[t]` solves problem
      t, `num_steps[t]` its steps (`num_steps.sum()` the chain's total).

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> fn = lambda y, a, x: 0.5 * jnp.cos(y) + x      # y_t = 0.5 cos(y_t) + x_t
      >>> xs = jnp.linspace(0.0, 1.0, 50)
      >>> warm = iterjax.fixed_point_chain(fn, jnp.array(0.0), xs, atol=1e-10)
      >>> cold = iterjax.fixed_point_chain(fn, jnp.array(0.0), xs, atol=1e-10,
      ...                                  warm_start=False)
      >>> bool(warm.num_steps.sum() < cold.num_steps.sum())
      True
    """
    if not jax.tree_util.tree_leaves(xs):
        raise ValueError("fixed_point_chain: `xs` has no arrays (no problems)")
    leaves = jax.tree_util.tree_leaves(xs)
    lengths = {jax.numpy.shape(x)[0] if jax.numpy.ndim(x) else None for x in leaves}
    if None in lengths or len(lengths) != 1:
        raise ValueError(
            "fixed_point_chain: every leaf of `xs` needs the same leading axis "
            f"(the number of problems), got leading sizes {sorted(map(str, lengths))}"
        )
    options = dict(
        solver=solver,
        atol=atol,
        rtol=rtol,
        max_steps=max_steps,
        adjoint=adjoint,
        throw=throw,
        norm=norm,
    )
    problem = lambda y, a: fn(y, a[0], a[1])

    def step(y_prev, x):
        start = y_prev if warm_start else y0
        sol = fixed_point(problem, start, (args, x), **options)
        return sol.value, sol

    _, sols = jax.lax.scan(step, y0, xs)
    return sols
