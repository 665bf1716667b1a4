"""Adjoints: how gradients flow through an iterative solve.

Differentiation is an object passed to `fixed_point(..., adjoint=...)`:

* `ImplicitAdjoint(linear_solver)`: the implicit function theorem. At the solution
  y* = f(y*, a), dy*/da = (I - ∂f/∂y)^{-1} ∂f/∂a. It is a `jax.custom_jvp` whose
  tangent is a `lax.custom_linear_solve` of (I - ∂f/∂y) t = (∂f/∂a) da, so forward
  mode (`jvp`) and reverse mode (`grad`, by transposition: (I - ∂f/∂y)^T u = v) both
  work. The forward iterations are never differentiated, so the backward pass costs
  one linear solve and memory independent of the number of forward steps. The
  initial guess y0 gets a zero gradient (the solution does not depend on it).
* `UnrolledAdjoint(checkpoint)`: backpropagate through the iterations themselves
  (a masked `lax.scan` of `max_steps` steps; memory grows with `max_steps` unless
  `checkpoint=True`). Supports `jvp` and `grad`; gradients reach y0 too.
* `PhantomAdjoint(steps, damping)`: phantom gradients (Geng et al. 2021). The value
  is the solution; the gradient is that of `steps` damped iterations
  y <- (1 - λ) y + λ f(y, a) started at stop_gradient(y*). `steps=1, damping=1` is
  Jacobian-free backpropagation (Fung et al. 2022). Supports `jvp` and `grad`.

Functions that close over arrays being differentiated are handled: closed-over
values are hoisted into explicit arguments with `jax.closure_convert`.
"""

import abc
import functools

import jax
import jax.numpy as jnp

from . import _struct as struct
from . import _tree as tu
from ._checks import check_int, check_range
from ._module import Module
from .linear import AbstractLinearSolver, BiCGStab


class AbstractAdjoint(Module):
    """How `fixed_point`/`root` are differentiated."""

    @abc.abstractmethod
    def apply(self, solve, solver, fn, y0, args):
        """Return `solve(solver, fn, y0, args, unrolled=...)`, differentiated."""


def _hoist_closure(fn, y0, args):
    """Rewrite `fn(y, args)` as `fn2(y, (args, consts))` with no closed-over arrays."""
    closed, consts = jax.closure_convert(fn, y0, args)
    return (lambda y, a: closed(y, a[0], *a[1])), (args, consts)


@jax.custom_jvp
def _first_order_only(tree):
    """The identity, whose derivative raises (see `PhantomAdjoint`)."""
    return tree


@_first_order_only.defjvp
def _first_order_only_jvp(primals, tangents):
    raise ValueError(
        "PhantomAdjoint gives first derivatives only: its gradient is that of a few "
        "steps from the solution held fixed, whose own derivative is not the "
        "solution's second derivative. Use ImplicitAdjoint or UnrolledAdjoint "
        "for hessian, jacfwd(jacrev), grad of grad."
    )


def _stop(tree):
    return jax.lax.stop_gradient(tree)


class ImplicitAdjoint(AbstractAdjoint):
    """Implicit differentiation through the fixed-point condition.

    A backward solve that does not reach its tolerance (or breaks down) gives a
    NaN gradient, never a finite wrong one; so does a NaN cotangent. A forward
    solve that did not converge still gets the implicit gradient at the point
    it reached (fixed-budget DEQ training relies on it): its `Solution` says so,
    and `throw=True` raises, under `grad` too.

    Attributes:
      linear_solver: solves (I - ∂f/∂y) t = b matrix-free: `BiCGStab()` (default;
        the fastest accurate choice in benchmarks/fixed_point.py), `GMRES()` (the
        most robust: monotone residuals), `CG()` (only when I - ∂f/∂y is symmetric
        positive definite), `Neumann(terms)` or `Richardson()` (fixed-point
        iteration on the adjoint; converges when f is a contraction at y*).

    Example:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> def z_star(a):  # z* = a cos(z*); dz*/da by the implicit function theorem
      ...     f = lambda z, a: a * jnp.cos(z)
      ...     adjoint = iterjax.ImplicitAdjoint()  # the default
      ...     return iterjax.fixed_point(f, jnp.zeros(()), a, adjoint=adjoint).value
      >>> z, a = float(z_star(0.5)), 0.5
      >>> g = float(jax.grad(z_star)(a))  # = cos z* / (1 + a sin z*)
      >>> bool(abs(g - jnp.cos(z) / (1 + a * jnp.sin(z))) < 1e-4)
      True
    """

    linear_solver: AbstractLinearSolver = struct.field(
        pytree_node=False, default=BiCGStab()
    )

    def apply(self, solve, solver, fn, y0, args):
        fn2, args2 = _hoist_closure(fn, y0, args)
        sol = solve(_stop(solver), fn2, _stop(y0), _stop(args2), unrolled=False)
        value = _implicit_value(fn2, self.linear_solver, sol.value, args2)
        return sol.replace(value=value)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0, 1))
def _implicit_value(fn, linear_solver, y_star, args):
    return y_star


@_implicit_value.defjvp
def _implicit_value_jvp(fn, linear_solver, primals, tangents):
    y_star, args = primals
    _, dargs = tangents
    # y* does not depend on the initial guess: its tangent is ignored on purpose.
    # Inside the rule y* is itself the implicit function of args (this same
    # custom_jvp), so that differentiating the rule again (grad of grad, hessian)
    # sees y*'s dependence on args rather than a constant.
    y_star = _implicit_value(fn, linear_solver, y_star, args)
    _, rhs = jax.jvp(lambda a: fn(y_star, a), (args,), (dargs,))

    # Linearised once: each product replays only the tangent computation.
    _, f_y = jax.linearize(lambda y: fn(y, args), y_star)

    def matvec(t):  # (I - ∂f/∂y) t
        return tu.tree_sub(t, f_y(t))

    solve = _nan_unless_solved(linear_solver)
    dy = jax.lax.custom_linear_solve(matvec, rhs, solve=solve, transpose_solve=solve)
    return y_star, dy


def _nan_unless_solved(linear_solver):
    """`linear_solver.solve`, NaN where the solve did not reach its tolerance or
    broke down: under `grad` no flag is seen, and a capped backward solve's
    gradient can be far off (97% in one case), so it is NaN, never a plausible
    finite number. (A NaN cotangent gives NaN through the solvers too.)"""

    def solve(matvec, b):
        x, stats = linear_solver.solve_loop(matvec, b)
        ok = stats.converged & ~stats.breakdown
        return tu.tree_map(lambda a: jnp.where(ok, a, jnp.nan), x)

    return solve


class UnrolledAdjoint(AbstractAdjoint):
    """Differentiate through every iteration (reverse or forward mode).

    Attributes:
      checkpoint: rematerialise each step in the backward pass (`jax.checkpoint`),
        trading compute for memory.

    Example:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> def z_star(a):  # differentiated through every step taken
      ...     f = lambda z, a: a * jnp.cos(z)
      ...     adjoint = iterjax.UnrolledAdjoint()
      ...     return iterjax.fixed_point(f, jnp.zeros(()), a, adjoint=adjoint).value
      >>> bool(jnp.isfinite(jax.grad(z_star)(0.5)))
      True
    """

    checkpoint: bool = struct.field(pytree_node=False, default=False)

    def apply(self, solve, solver, fn, y0, args):
        if self.checkpoint:
            fn = jax.checkpoint(fn)
        return solve(solver, fn, y0, args, unrolled=True)


class PhantomAdjoint(AbstractAdjoint):
    """Phantom gradient: backpropagate through `steps` damped steps at the solution.

    Attributes:
      steps: number of unrolled steps k >= 1 (k=1, damping=1: Jacobian-free backprop).
      damping: λ in (0, 1].
    """

    steps: int = struct.field(pytree_node=False, default=1)
    damping: float = 1.0

    def __post_init__(self):
        check_int("PhantomAdjoint", "steps", self.steps, 1)
        check_range("PhantomAdjoint", "damping", self.damping, 0.0, 1.0, lo_open=True)

    def apply(self, solve, solver, fn, y0, args):
        fn2, args2 = _hoist_closure(fn, y0, args)
        sol = solve(_stop(solver), fn2, _stop(y0), _stop(args2), unrolled=False)

        def phantom(a, y):  # k damped steps from the (held) solution
            step = lambda _, z: tu.tree_lerp(self.damping, z, fn2(z, a))
            return jax.lax.fori_loop(0, self.steps, step, y)

        # The value is exactly y*; its tangent is the phantom steps'. Their
        # primal inputs pass `_first_order_only`, whose own derivative raises:
        # a second derivative would differentiate the phantom steps' Jacobian
        # with y* held fixed, which is not y*'s second derivative.
        @jax.custom_jvp
        def value(a, y):
            return y

        @value.defjvp
        def _(primals, tangents):
            (a, y), (da, _) = primals, tangents
            _, dz = jax.jvp(lambda a: phantom(a, y), (_first_order_only(a),), (da,))
            return y, dz

        return sol.replace(value=value(args2, _stop(sol.value)))
