"""`iterjax.scan`: `jax.lax.scan` solved over the whole sequence at once."""

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .. import _struct as struct
from .._checks import (
    check_floating,
    check_int,
    check_range,
    check_same_structure,
    eval_shape,
)
from .._iterate import iterative_solve
from .._solution import error_if_failed
from .._tree import ravel
from .._types import Array, ArrayLike, Bool, Float, Int, PyTree, Y
from ._core import (
    AbstractSequenceMethod,
    Sweeps,
    linear_recurrence,
    non_finite_tail,
    shard_time,
    shift,
)
from .deer import DEER


class Sequential(AbstractSequenceMethod):
    """Plain `jax.lax.scan`: the reference, and the method for integer carries.

    Example:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> f = lambda h, x: (h + x, h)
      >>> method = iterjax.Sequential()
      >>> h, ys = iterjax.scan(f, jnp.zeros(()), jnp.ones(5), method=method)
      >>> float(h), [float(y) for y in ys]  # lax.scan itself
      (5.0, [0.0, 1.0, 2.0, 3.0, 4.0])
    """


@struct.dataclass
class ScanStats:
    """How a parallel scan went (`iterjax.scan(..., return_stats=True)`).

    Attributes:
      num_sweeps: sweeps taken (each one parallel evaluation of f over the
        sequence); 0 for `Sequential`.
      converged: every position was accepted: its residual |f(s_{t-1}, x_t) -
        s_t| at the returned values is <= atol + rtol |s_t|, and so was the
        method's error estimate |δ_t| when it passed (see `scan`).
      residual: the largest |f(s_{t-1}, x_t) - s_t| of a position when it
        passed or was accepted (0 where it was made exact), and of the others
        at the last sweep.
      result: 0 converged, 1 max_sweeps reached, 2 non-finite, 4 a traced
        tolerance that is negative or NaN (nothing was solved).
      fallbacks: sweeps in which some position's update was not finite and fell back
        to the Jacobi update.
      trace: after every sweep, the largest of its residuals and updates (the
        quantity of the stopping test, above the tolerance while a position is
        not accepted; `trace=True`), else None.
      jacobians: sweeps that computed the A_t (every sweep of DEER, ELK and the
        quasi methods but the last, which tests the last update, unless
        `jacobian_every` > 1; 0 for Jacobi and Picard).
      update: the largest correction |δ_t|, taken as `residual` is: the
        method's estimate of the remaining error (to first order for DEER); the
        returned carries include these corrections (tested after them).
      evaluations: evaluations of f at positions not yet accepted, summed over
        the sweeps: the work an implementation with dynamic shapes does (as
        ParaDiGMS's loop, whose window shrinks at the end of the sequence). A
        sweep computes f on its whole window (T, or W), so the work done here is
        num_sweeps x window; T for `Sequential`.
    """

    num_sweeps: Int[Array, "*batch"]
    converged: Bool[Array, "*batch"]
    residual: Float[Array, "*batch"]
    result: Int[Array, "*batch"]
    fallbacks: Int[Array, "*batch"]
    trace: Float[Array, "*batch max_sweeps"] | None = None
    jacobians: Int[Array, "*batch"] | None = None
    update: Float[Array, "*batch"] | None = None
    evaluations: Int[Array, "*batch"] | None = None


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Y,
    xs: PyTree[ArrayLike] | None = None,
    length: int | None = None,
    reverse: bool = False,
    *,
    method: AbstractSequenceMethod = DEER(),
    atol: float = 1e-6,
    rtol: float = 0.0,
    max_sweeps: int | None = None,
    acceptance: str = "tested",
    polish: AbstractSequenceMethod | None = None,
    return_stats: bool = False,
    throw: bool = False,
    trace: bool = False,
):
    """`jax.lax.scan(f, init, xs, length, reverse)`, solved in parallel over time.

    The carries s_1..s_T of s_t = f(s_{t-1}, x_t)[0] are found together by sweeps of
    `method` (see `iterjax.sequence`), then the outputs y_t = f(s_{t-1}, x_t)[1] are
    evaluated in one parallel pass.

    Guarantee: with `converged`, every returned carry was tested as returned,
    against its returned predecessor: |f(s_{t-1}, x_t) - s_t| <= atol + rtol |s_t|
    for every t and component. The result is lax.scan's trajectory of f
    perturbed by at most that much per step, so its error is at most the
    tolerance propagated through the recurrence, Σ_{u<=t} |∂s_t/∂s_u| (atol +
    rtol |s_u|) (atol per step where the recurrence contracts). Each position
    also passed the method's error estimate |δ_t| <= atol + rtol |s_t|, δ its
    correction: with `DEER` that is the error to first order, so a converged
    solve is within about atol of lax.scan's however much the recurrence
    amplifies errors. The other methods' estimates are exact only as far as
    their A_t match the Jacobian; on recurrences that amplify errors prefer
    `DEER` or `ELK`, polish with DEER (`polish=DEER()`), or tighten atol. With
    atol = rtol = 0 the carries are f's own values along the trajectory
    (bitwise lax.scan's where f evaluated over a batch of t rounds as f alone).
    At most T sweeps (accepted prefixes freeze, and every sweep accepts one more
    position), so `max_sweeps` defaults to T. A sweep is one parallel
    evaluation of f (over the method's window); the last one tests the last
    update and evaluates f alone.

    Gradients (`grad`, `jvp`, `vjp`) are those of the recurrence at the solution,
    computed by one more parallel solve of the linear (reverse, for `grad`)
    recurrence of tangents with the same method; no sweep is stored.

    Args:
      f: `f(carry, x) -> (carry, y)`, as for `lax.scan`. The carry must keep its
        pytree structure, shapes and dtypes; its leaves must be float (use
        `Sequential()` for integer carries).
      init, xs, length, reverse: as for `lax.scan`.
      method: `DEER()` (default), `QuasiDEER()`, `ELK()`, `Jacobi()`,
        `GaussSeidel(block)`, `iterjax.sequence.Picard()` or `Sequential()`.
      atol, rtol: tolerances on the per-step residual and update.
      max_sweeps: the largest number of sweeps (default and at most useful: T).
      acceptance: "tested" (default): a position is accepted when its residual
        and its update pass. "paradigms": ParaDiGMS's rule (Shih et al. 2023):
        the update alone, and each sweep also accepts, untested, the first
        position after the prefix that passed; the window slides one position
        further per sweep (about one evaluation fewer per sweep, the loop's
        own passes and evaluations), but "converged" then bounds neither the
        residuals nor that position's update.
      polish: a second method, run from `method`'s solution until its own
        sweeps converge too. With `polish=DEER()`, a cheap approximate method
        (quasi-DEER, quasi-ELK, Jacobi, Picard) ends with DEER's error bound
        (its update is the remaining error to first order), typically in 2-3
        dense sweeps; the approximate methods' own test cannot see errors that
        the recurrence amplifies. `ScanStats` counts both stages' sweeps and
        reports the second's residual, update and convergence; gradients use
        `polish`'s linear recurrences.
      return_stats: also return a `ScanStats`.
      throw: raise `NonConvergenceError` when the solve did not converge.
      trace: record max(residual, update) after each sweep in `ScanStats.trace`.

    Returns:
      `(carry, ys)`, or `(carry, ys, stats)` with `return_stats=True`.

    Examples:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> def cell(h, x):  # a tanh RNN
      ...     h = jnp.tanh(0.5 * h + x)
      ...     return h, 2 * h
      >>> xs = jnp.linspace(-1.0, 1.0, 1000)
      >>> h, ys, stats = iterjax.scan(cell, 0.0, xs, return_stats=True)
      >>> h_ref, ys_ref = jax.lax.scan(cell, 0.0, xs)
      >>> bool(jnp.max(jnp.abs(ys - ys_ref)) < 1e-5), int(stats.num_sweeps) < 10
      (True, True)
    """
    T = _check_call(f, init, xs, length, method, atol, rtol, max_sweeps)
    if polish is not None and (
        not isinstance(polish, AbstractSequenceMethod) or isinstance(polish, Sequential)
    ):
        raise TypeError(
            "scan: `polish` must be a parallel sequence method (DEER(), ELK() ...) "
            f"or None, got {polish!r}"
        )
    if acceptance not in ("tested", "paradigms"):
        raise ValueError(
            f"scan: `acceptance` must be 'tested' or 'paradigms', got {acceptance!r}"
        )
    if isinstance(method, Sequential) or T == 0:  # nothing to solve for when T = 0
        carry, ys = jax.lax.scan(f, init, xs, length=length, reverse=reverse)
        zero = jnp.zeros((), jnp.result_type(*jtu.tree_leaves(init)))
        none = jnp.int32(0)
        stats = ScanStats(
            none,
            jnp.bool_(True),
            zero,
            none,
            none,
            jacobians=none,
            update=zero,
            evaluations=jnp.int32(T),
        )
        return (carry, ys, stats) if return_stats else (carry, ys)

    if reverse:
        xs = _flip(xs)
    s0, unravel = ravel(init)
    cell, consts = flat_cell(f, init, s0, unravel, xs)
    paradigms = acceptance == "paradigms"
    methods = (method,) if polish is None else (method, polish)
    options = (methods, atol, rtol)
    X, stats = _solve(cell, options, s0, xs, consts, T, max_sweeps, trace, paradigms)
    outputs = lambda h, x: f(unravel(h), x)[1]
    ys = jax.vmap(outputs)(shift(X, s0, method.mesh), xs)
    if reverse:
        ys = _flip(ys)
    if throw:
        error_if_failed(stats.result, "scan")
    carry = unravel(X[-1])
    return (carry, ys, stats) if return_stats else (carry, ys)


def _flip(tree):
    """Reverse the time axis of every leaf."""
    return jtu.tree_map(lambda a: jnp.flip(a, 0), tree)


def flat_cell(f, init, s0, unravel, xs):
    """The carry update on flat vectors, with closed-over arrays hoisted out."""

    def cell(h, x):
        carry = f(unravel(h), x)[0]
        return ravel(carry)[0]

    x0 = jtu.tree_map(lambda a: a[0], xs)
    closed, consts = jax.closure_convert(cell, s0, x0)
    return (lambda h, x, c: closed(h, x, *c)), tuple(consts)


def _solve(cell, options, s0, xs, consts, T, max_sweeps, trace, paradigms):
    """Solve for X = (s_1..s_T) by sweeps; differentiable in (s0, xs, consts).

    `options` is (methods, atol, rtol): the sweeps of each method in turn, the
    first from a guess that repeats s_0, each next from the last's solution
    (`polish`). The tangent and adjoint recurrences use the last method.
    """
    methods, atol, rtol = options
    args = jax.lax.stop_gradient((s0, xs, consts))
    max_sweeps = T if max_sweeps is None else max_sweeps
    X = jnp.broadcast_to(args[0], (T,) + s0.shape)
    stats = None
    for method in methods:
        X = shard_time(X, method.mesh)
        margs = (args[0], shard_time(args[1], method.mesh), args[2])
        sol = iterative_solve(
            Sweeps(method, atol, rtol, paradigms),
            cell,
            X,
            margs,
            atol=atol,
            rtol=rtol,
            max_steps=max_sweeps,
            trace=trace,
        )
        X, stats = sol.value, _then(stats, _stats(sol))
    X = non_finite_tail(X, methods[-1].mesh)
    X = _trajectory(cell, (methods[-1], atol, rtol), X, (s0, xs, consts))
    return X, stats


def _stats(sol):
    return ScanStats(
        num_sweeps=sol.num_steps,
        converged=sol.converged,
        residual=sol.stats["residual"],
        result=sol.result,
        fallbacks=sol.stats["fallbacks"],
        trace=sol.trace,
        jacobians=sol.stats["jacobians"],
        update=sol.stats["update"],
        evaluations=sol.stats["evaluations"],
    )


def _then(first, second):
    """The stats of two stages run one after the other: counts add up, the
    second stage's outcome stands, traces join (the second's after the first's
    sweeps)."""
    if first is None:
        return second
    trace = None
    if second.trace is not None:  # the second's entries after the first's sweeps
        n = first.trace.shape[0]
        k = jnp.arange(2 * n, dtype=first.num_sweeps.dtype)
        before = first.trace[jnp.minimum(k, n - 1)]
        after = second.trace[jnp.clip(k - first.num_sweeps, 0, n - 1)]
        trace = jnp.where(k < first.num_sweeps, before, after)
    return second.replace(
        num_sweeps=first.num_sweeps + second.num_sweeps,
        fallbacks=first.fallbacks + second.fallbacks,
        jacobians=first.jacobians + second.jacobians,
        evaluations=first.evaluations + second.evaluations,
        trace=trace,
    )


def _trajectory_map(cell, X, args):
    """F(X)_t = f(X_{t-1}, x_t): the map whose fixed point is the trajectory."""
    s0, xs, consts = args
    return jax.vmap(lambda h, x: cell(h, x, consts))(shift(X, s0), xs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _trajectory(cell, options, X, args):
    return X


@_trajectory.defjvp
def _trajectory_jvp(cell, options, primals, tangents):
    """Tangent of the trajectory: (I - ∂F/∂X) dX = (∂F/∂args) dargs.

    ∂F/∂X is J_t on the sub-diagonal, so the solve is the linear recurrence
    dX_t = J_t dX_{t-1} + b_t, and its transpose (for `grad`) the reverse recurrence
    u_t = J_{t+1}^T u_{t+1} + v_t. Both are solved by the same parallel sweeps as
    the forward problem, on a linear cell.
    """
    X, args = primals
    _, dargs = tangents
    X = _trajectory(cell, options, X, args)  # so that the rule's own derivative
    # (hessian, grad of grad) sees X's dependence on args, as `implicit` does
    _, rhs = jax.jvp(lambda a: _trajectory_map(cell, X, a), (args,), (dargs,))

    def matvec(t):
        return t - jax.jvp(lambda Y: _trajectory_map(cell, Y, args), (X,), (t,))[1]

    solve = lambda _, b: _tangent_recurrence(cell, options, X, args, b)
    transpose_solve = lambda _, v: _cotangent_recurrence(cell, options, X, args, v)
    dX = jax.lax.custom_linear_solve(matvec, rhs, solve, transpose_solve)
    return X, dX


def _newton_jacobians(cell, options, X, args):
    """J_t = ∂f/∂h at (X_{t-1}, x_t), from the method's own `linearize`, when it is
    exact on a linear recurrence (DEER): the tangent and adjoint recurrences are
    then one `linear_recurrence` each; else None (they take sweeps)."""
    method = options[0]
    if not method.exact_on_linear():
        return None
    s0, xs, consts = args
    return method.linearize(lambda h, x: cell(h, x, consts), shift(X, s0), xs)[1]


def _linear_sweeps(options, cell, inputs, s0):
    """Solve a linear recurrence h_t = cell(h_{t-1}, inputs_t) from h_0 = 0 (the
    `Solution` of its sweeps).

    Exact after at most T sweeps (frozen prefix). The method's A_t do not depend
    on the iterate here, so they are computed once (not every sweep) where that
    costs no more memory than the sweeps themselves: when they are diagonal, or
    dense without a `window`.
    """
    method, atol, rtol = options
    T = inputs[0].shape[0]
    zero = jnp.zeros_like(s0)
    X0 = jnp.zeros((T,) + zero.shape, zero.dtype)
    A = jax.eval_shape(lambda: method.linearize(cell, X0, inputs)[1])
    if A is not None and (A.ndim == X0.ndim or method.window is None):
        A = method.linearize(cell, X0, inputs)[1]
        method = _FixedJacobians(method, window=method.window, mesh=method.mesh)
        cell, inputs = _ignore_last(cell), (inputs, A)
    return iterative_solve(
        Sweeps(method, atol, rtol),
        lambda h, x, _: cell(h, x),
        X0,
        (zero, inputs, ()),
        atol=atol,
        rtol=rtol,
        max_steps=T,
    )


def _ignore_last(cell):
    return lambda h, inp: cell(h, inp[0])


class _FixedJacobians(AbstractSequenceMethod):
    """`method` with its A_t computed once, carried along with the inputs (and so
    windowed and sharded with them): `inputs_t = (x_t, A_t)`."""

    method: AbstractSequenceMethod

    def linearize(self, cell, prev, xs):
        return jax.vmap(cell)(prev, xs), xs[1]

    def sweep(self, cell, s0, X, xs, r, A, frozen):
        return self.method.sweep(cell, s0, X, xs, r, A, frozen)


def _tangent_recurrence(cell, options, X, args, b):
    """dX_t = J_t dX_{t-1} + b_t, J_t = ∂f/∂h at (X_{t-1}, x_t)."""
    s0, xs, consts = args
    J = _newton_jacobians(cell, options, X, args)
    if J is not None:
        return linear_recurrence(J, b, options[0].mesh)

    def lin(h, inp):
        p, x, bt = inp
        return jax.jvp(lambda q: cell(q, x, consts), (p,), (h,))[1] + bt

    return _linear_sweeps(options, lin, (shift(X, s0), xs, b), s0).value


def _cotangent_recurrence(cell, options, X, args, v):
    """u_t = J_{t+1}^T u_{t+1} + v_t (u_{T+1} = 0), solved as a forward recurrence
    over the reversed sequence."""
    s0, xs, consts = args
    T = X.shape[0]
    J = _newton_jacobians(cell, options, X, args)
    if J is not None:  # J_{t+1}^T, reversed; the last position has no successor
        Jt = jnp.swapaxes(jnp.flip(J[1:], 0), -1, -2)
        A = jnp.concatenate([jnp.zeros_like(J[:1]), Jt])
        return jnp.flip(linear_recurrence(A, jnp.flip(v, 0), options[0].mesh), 0)
    # Step t+1 reads X_t and x_{t+1}; the last position has no successor.
    x_next = jtu.tree_map(lambda a: jnp.concatenate([a[1:], a[-1:]]), xs)
    has_next = jnp.arange(T) < T - 1

    def lin(u, inp):
        p, x, vt, m = inp
        _, pullback = jax.vjp(lambda q: cell(q, x, consts), p)
        return jnp.where(m, pullback(u)[0], 0) + vt

    u = _linear_sweeps(options, lin, _flip((X, x_next, v, has_next)), s0).value
    return jnp.flip(u, 0)


def _check_call(f, init, xs, length, method, atol, rtol, max_sweeps):
    """Validate a `scan` call; return the sequence length T."""
    if not callable(f):
        raise TypeError(f"scan: `f` must be callable, got {type(f).__name__}")
    if not isinstance(method, AbstractSequenceMethod):
        raise TypeError(
            "scan: `method` must be an iterjax sequence method (Sequential, Jacobi, "
            f"GaussSeidel, Picard, DEER, QuasiDEER, ELK), got {method!r}"
        )
    check_range("scan", "atol", atol, lo=0.0)
    check_range("scan", "rtol", rtol, lo=0.0)
    if max_sweeps is not None:
        check_int("scan", "max_sweeps", max_sweeps, 1)
    leaves = jtu.tree_leaves_with_path(xs)
    lengths = {jnp.shape(a)[0] if jnp.ndim(a) else None for _, a in leaves}
    if None in lengths:
        path = next(p for p, a in leaves if not jnp.ndim(a))
        raise ValueError(
            f"scan: every leaf of `xs` needs a leading time axis; xs{jtu.keystr(path)} "
            "is a scalar"
        )
    if len(lengths) > 1:
        shapes = ", ".join(f"xs{jtu.keystr(p)}: {jnp.shape(a)}" for p, a in leaves)
        raise ValueError(
            f"scan: the leaves of `xs` have different leading axis sizes ({shapes})"
        )
    if length is not None:
        check_int("scan", "length", length, 0)
        if lengths and lengths != {length}:
            raise ValueError(
                f"scan: `length`={length} but `xs` has leading axis size "
                f"{lengths.pop()}"
            )
    elif not lengths:
        raise ValueError("scan: pass `xs` with a leading time axis, or `length`")
    T = length if length is not None else lengths.pop()
    mesh = getattr(method, "mesh", None)
    if mesh is not None and T % mesh.size:
        raise ValueError(
            f"scan: the sequence length {T} must be divisible by the {mesh.size} "
            "devices of `method.mesh` (pad the sequence, or use another mesh)"
        )
    x0 = jtu.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), xs)
    out = eval_shape("scan", "f(init, xs[0])", f, init, x0, names=("init", "xs[0]"))
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ValueError(
            "scan: `f(carry, x)` must return a pair (new_carry, y), got "
            f"{jtu.tree_structure(out)}"
        )
    check_same_structure(
        "scan", "f(carry, x)[0] (the new carry)", out[0], init, expected_name="init"
    )
    if not isinstance(method, Sequential):
        hint = (
            f" ({type(method).__name__} needs a float carry; use "
            "iterjax.Sequential() for integer or complex carries)"
        )
        check_floating("scan", "init", init, hint)
    return T
