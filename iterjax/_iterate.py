"""The one driver loop behind every iterative solver.

A solver is an immutable pytree of hyperparameters with three pure methods::

    state = solver.init(fn, y0, args)            # evaluates fn(y0, args)
    y, state = solver.step(fn, y, args, state)   # one iteration, one fn evaluation
    state.residual                               # fn(y, args) - y at the current y

`iterative_solve` owns the loop: `lax.while_loop` bounded by `max_steps` for the
forward solve, or a masked `lax.scan` of `max_steps` steps when the loop itself is
differentiated (`UnrolledAdjoint`). After every step it applies the stopping rule

    |fn(y) - y|_i <= atol + rtol * |y|_i   for every element i,

and stops early on non-finite residuals. Another norm can replace the infinity
norm: `norm(r / (atol + rtol |y|)) <= 1`. Under `vmap` the loop runs until every lane
is done; JAX's batching of `while_loop` selects the old carry for finished lanes, so
each element keeps its own `num_steps` and its converged value stops changing.

A solver whose `lazy_init(y0)` gives a state from which `step` itself evaluates
fn(y0) (Picard) has that evaluation run as the loop's first iteration instead of
before the loop: one dispatch fewer per solve.
"""

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from . import _tree as tu
from ._module import Module
from ._solution import INVALID_TOLERANCE, Solution, result_code
from ._types import Array, Bool, Float, Int


class AbstractFixedPointSolver(Module):
    """Base class of the solvers of `fixed_point` and `root`.

    Concrete solvers hold hyperparameters as fields (floats are pytree leaves, so
    they can be vmapped over; structural ints are static) and never loop.
    """

    @abc.abstractmethod
    def init(self, fn, y0, args):
        """Initial state; must hold `residual = fn(y0, args) - y0`."""

    @abc.abstractmethod
    def step(self, fn, y, args, state):
        """One iteration: returns `(y_next, state_next)` with identical structure."""

    def lazy_init(self, y0):
        """Optional: a state from which `step(fn, y0, args, state)` returns exactly
        `(y0, init(fn, y0, args))`, built without evaluating fn. The driver's loop
        then makes the initial evaluation its first iteration, which saves a
        separate dispatch per solve (a few µs, visible on µs-scale solves).
        None (the default): `init` runs before the loop."""
        return None

    def summary(self, state) -> dict:
        """Solver-specific extras for `Solution.stats`, from the final state."""
        return {}

    def displacement(self, y, y0, num_steps, state):
        """The estimate of the infimal displacement vector v (`Solution.
        displacement`): where the map has no fixed point, Picard-type iterates
        drift as y_k ≈ y_0 + k v (Pazy 1971), so the normalised iterate
        (y_k - y_0) / k (error O(1/k)) is the default; 0 when v = 0."""
        k = jnp.maximum(num_steps, 1)
        return jax.tree_util.tree_map(lambda a, b: (a - b) / k.astype(a.dtype), y, y0)


def check_solver(owner, solver, name="solver"):
    """TypeError naming `owner.name` unless `solver` is an iterjax solver."""
    if not isinstance(solver, AbstractFixedPointSolver):
        raise TypeError(f"{owner}: `{name}` must be an iterjax solver, got {solver!r}")


class _Carry(NamedTuple):
    y: object
    state: object
    num_steps: Int[Array, ""]
    done: Bool[Array, ""]
    converged: Bool[Array, ""]
    residual: Float[Array, ""]
    marks: Float[Array, "2"]  # residual norms at the last two steps 2^j
    trace: Any  # shape=(max_steps,) or None


def residual_status(y, residual_tree, atol, rtol, norm):
    """(converged, finite, |r|) of a residual pytree: one reduction when rtol=0."""
    size = norm(residual_tree)
    finite = jnp.isfinite(size)
    if isinstance(rtol, (int, float)) and rtol == 0:
        converged = size <= atol
    else:
        converged = norm(tu.tree_scaled(residual_tree, y, atol, rtol)) <= 1
    return converged & finite, finite, size


def iterative_solve(
    solver,
    fn,
    y0,
    args,
    *,
    atol,
    rtol,
    max_steps,
    norm=tu.max_abs,
    trace=False,
    unrolled=False,
) -> Solution:
    """Run `solver` on the fixed-point map `fn` from `y0` and return a `Solution`.

    Args:
      solver: an `AbstractFixedPointSolver`.
      fn: `fn(y, args) -> y`-like pytree.
      y0, args: initial guess and parameters (pytrees).
      atol, rtol: stopping tolerances (see module docstring).
      norm: the norm of the stopping rule, `norm(r / (atol + rtol |y|)) <= 1`
        (`norm(r) <= atol` when rtol is 0); default the infinity norm.
      max_steps: static bound on the number of steps.
      trace: also record the residual norm after every step.
      unrolled: run a fixed-length masked `lax.scan` instead of a `while_loop`, so
        that reverse-mode AD can differentiate through the iterations.
    """
    # Concrete tolerances are checked at the public boundary; traced ones here: a
    # negative or NaN one stops the solve before its first step, with its own code.
    invalid = _invalid_tolerance(atol, rtol)
    state = None if unrolled else solver.lazy_init(y0)
    if state is None:
        state = solver.init(fn, y0, args)
        converged, finite, size = residual_status(y0, state.residual, atol, rtol, norm)
        done = ~finite | converged | invalid
        start = (y0, state, jnp.int32(0), done, converged & ~invalid, size)
    else:  # iteration "-1" of the loop evaluates fn(y0)
        real = jax.eval_shape(norm, state.residual).dtype
        no = jnp.bool_(False)
        start = (y0, state, jnp.int32(-1), invalid, no, jnp.array(jnp.inf, real))
    marks = jnp.full((2,), start[-1])
    trace_buf = jnp.full((max_steps,), jnp.nan, start[-1].dtype) if trace else None
    carry = _Carry(*start, marks, trace_buf)

    def body(c):
        y, s = solver.step(fn, c.y, args, c.state)
        conv, fin, nrm = residual_status(y, s.residual, atol, rtol, norm)
        tr = None
        if c.trace is not None:  # (step -1, the lazy init, is not recorded)
            tr = c.trace.at[c.num_steps].set(
                nrm, mode="drop", wrap_negative_indices=False
            )
        n = c.num_steps + 1
        power = (n > 0) & ((n & (n - 1)) == 0)
        marks = jnp.where(power, jnp.stack([c.marks[1], nrm]), c.marks)
        return _Carry(y, s, n, conv | ~fin, conv, nrm, marks, tr)

    if unrolled:
        # Mask with `where`, not `lax.cond`: residuals of a cond inside a scan are
        # stacked per step even when loop-invariant (e.g. a weight matrix), which
        # made reverse-mode memory O(max_steps * |args|) instead of O(max_steps * |y|).
        def masked(c, _):
            return tu.tree_where(c.done, c, body(c)), None

        carry, _ = jax.lax.scan(masked, carry, None, length=max_steps)
    else:
        cond = lambda c: ~c.done & (c.num_steps < max_steps)
        try:
            carry = jax.lax.while_loop(cond, body, carry)
        except ValueError as e:
            if "not found in mesh" not in str(e):
                raise
            raise ValueError(_EXPLICIT_MODE) from e

    num_steps = jnp.maximum(carry.num_steps, 0)  # -1: a lazy init never run
    v = solver.displacement(carry.y, y0, num_steps, carry.state)
    result = result_code(carry.converged, jnp.isfinite(carry.residual))
    return Solution(
        value=carry.y,
        converged=carry.converged,
        num_steps=num_steps,
        residual=carry.residual,
        result=jnp.where(invalid, jnp.int32(INVALID_TOLERANCE), result),
        trace=carry.trace,
        stats=solver.summary(carry.state),
        displacement=v,
        drifting=_drifting(carry, norm(v)),
    )


_EXPLICIT_MODE = (
    "iterjax: this solve is vmapped over a batch sharded in JAX's Explicit mode "
    "(jax.make_mesh's default axis type), and jax cannot batch a while_loop with a "
    "per-element stopping test there (plain JAX fails the same way). Give the "
    "batch's mesh Auto axes: jax.make_mesh(shape, names, "
    "axis_types=(jax.sharding.AxisType.Auto,) * len(names)), as configs' `mesh:` "
    "does"
)


def _invalid_tolerance(atol, rtol):
    """True where a traced atol or rtol is negative or NaN (False when concrete)."""
    if not any(isinstance(t, jax.core.Tracer) for t in (atol, rtol)):
        return jnp.bool_(False)
    return ~((jnp.asarray(atol) >= 0) & (jnp.asarray(rtol) >= 0))


def _drifting(c, v_norm):
    """Not converged, and the iterates drift along v: over at least the last half
    of the run the residual norm fell by less than 10%, and |v| accounts for at
    least 90% of it. A map without a fixed point (an infeasible problem) does
    this; so does, within `max_steps`, one whose fixed point is too far away to
    tell apart from a translation."""
    stalled = c.residual >= 0.9 * c.marks[0]
    explained = v_norm >= 0.9 * c.residual
    finite = jnp.isfinite(c.residual)
    return ~c.converged & finite & (c.num_steps >= 8) & stalled & explained


def counts(solver, state) -> dict:
    """The integer entries of `solver.summary(state)`: counts (JVPs, Jacobians,
    restarts ...), which add up over the states a wrapper discards and rebuilds.
    Float entries are estimates (a contraction factor) and do not."""
    summary = solver.summary(state)
    integer = lambda v: jnp.issubdtype(jnp.result_type(v), jnp.integer)
    return {k: v for k, v in summary.items() if integer(v)}


def nothing_spent(solver, state) -> dict:
    """Zero counts, of the kinds `solver.summary(state)` reports: the `spent` of
    a wrapper that has discarded no inner state yet."""
    return jax.tree.map(jnp.zeros_like, counts(solver, state))


def spend(spent: dict, solver, state, where) -> dict:
    """`spent` plus the counts of `state` where it is discarded (`where`)."""
    lost = counts(solver, state)
    return {k: spent[k] + jnp.where(where, lost[k], 0) for k in spent}


def with_spent(summary: dict, spent: dict) -> dict:
    """A summary whose counts include `spent` (counts of other states)."""
    return {**spent, **{k: v + spent.get(k, 0) for k, v in summary.items()}}


def state_at(solver, y, residual, args):
    """`solver.init` at `y` where `fn(y) - y = residual` is already known.

    `init` evaluates fn once, at its y0; here it is handed a map that returns the
    known value y + residual, so the state (e.g. a restart's) costs no evaluation.
    """
    fy = tu.tree_add(y, residual)
    return solver.init(lambda *_: fy, y, args)
