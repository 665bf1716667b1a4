"""The one path through a fixed-point solve: the call is validated once, at the
public boundary, then `iterative_solve` runs under the adjoint. `fixed_point`,
`root`, `finite_sum_fixed_point` and `argmin` all go through `solve`.

DESIGN: who owns an option. The *call* owns the options of the stopping rule
and of the record (atol, rtol, max_steps, norm, trace, throw); the *solver*
owns its algorithm's hyperparameters (history, damping, the linear solver).
The public functions take the former as keywords, as DESIGN.md's contract
states, and hand them, untouched, to `solve` as one `options` mapping; from
there only `check_call` reads them (once) and only `iterative_solve` uses them
(the stopping test is the driver's, never a solver's). We did not take the
optimistix route (the solver carries rtol/atol/norm) for three reasons: one
solver object is reused across problems of different scale, so the tolerance
belongs to the problem; `Switched`, `Restarted` and the other wrappers would
have to reconcile two inner solvers' tolerances, which is a second owner; and
a traced tolerance (vmapped over, or a config sweep) stays an argument of the
call rather than a leaf that must be threaded through every solver's pytree.
A frozen options object was rejected as a public type: it would be a fourth
spelling of the same keywords. `iterjax.scan`'s `Sweeps` is the one solver
that sees atol/rtol, because accepting a prefix of positions is part of its
step; it applies the driver's own elementwise test (the infinity norm), so the
two agree on when a solve has converged.
"""

import functools

import jax.numpy as jnp

from . import _tree as tu
from ._checks import (
    check_inexact,
    check_int,
    check_range,
    check_same_structure,
    eval_shape,
)
from ._iterate import AbstractFixedPointSolver, iterative_solve
from ._solution import NONFINITE, error_if_failed
from .implicit import AbstractAdjoint


def solve(what, user_fn, fn, y0, args, solver, adjoint, throw, **options):
    """Validate the user's call, then solve y = fn(y, args) as `adjoint` says."""
    check_call(
        what,
        user_fn,
        y0,
        args,
        solver,
        options["atol"],
        options["rtol"],
        options["max_steps"],
        adjoint,
    )
    run = functools.partial(iterative_solve, **options)
    sol = adjoint.apply(run, solver, fn, y0, args)
    if throw:
        error_if_failed(sol.result, what)
    return nan_if_nonfinite(sol)


def nan_if_nonfinite(sol):
    """NaN in, NaN out: a solve that stopped on a non-finite residual (fn gave
    NaN or inf at its last iterate) returns NaN, not that iterate as if it were
    an answer; `result` says why."""
    finite = sol.result != NONFINITE
    nan = tu.tree_map(lambda a: jnp.full_like(a, jnp.nan), sol.value)
    return sol.replace(value=tu.tree_where(finite, sol.value, nan))


def check_call(what, fn, y0, args, solver, atol, rtol, max_steps, adjoint):
    if not callable(fn):
        raise TypeError(f"{what}: `fn` must be callable, got {type(fn).__name__}")
    if not isinstance(solver, AbstractFixedPointSolver):
        raise TypeError(
            f"{what}: `solver` must be an iterjax solver (Picard, Anderson, Broyden, "
            f"Newton, Halpern), got {solver!r}"
        )
    if not isinstance(adjoint, AbstractAdjoint):
        raise TypeError(
            f"{what}: `adjoint` must be ImplicitAdjoint, UnrolledAdjoint or "
            f"PhantomAdjoint, got {adjoint!r}"
        )
    check_int(what, "max_steps", max_steps, 1)
    check_range(what, "atol", atol, lo=0.0)
    check_range(what, "rtol", rtol, lo=0.0)
    check_inexact(what, "y0", y0)
    out = eval_shape(what, "fn(y0, args)", fn, y0, args, names=("y0", "args"))
    check_same_structure(what, "fn(y0, args)", out, tu.tree_structs(y0))
