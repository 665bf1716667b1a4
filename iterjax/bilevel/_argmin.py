"""`argmin`: the minimiser of an inner loss, differentiable in its parameters."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .. import _tree as tu
from .._checks import check_inexact
from .._iterate import AbstractFixedPointSolver
from .._solution import NONFINITE_LOSS, Solution, error_if_failed
from .._solve import solve
from .._types import Args, ArrayLike, Norm, Y
from ..fixed_point import Newton
from ..fixed_point.optax_solver import OptaxSolver
from ..implicit import AbstractAdjoint, ImplicitAdjoint
from ..linear import CG

# Each Newton system to η_k = min(0.5, √|∇g|) relative residual (scipy's Newton-CG):
# the fewest Hessian-vector products in benchmarks/bilevel.py. A fixed 1e-1 takes
# 3 more steps and 13-27% more products on logistic regression, Eisenstat-Walker
# forcing 15-40% more, exact steps 2-3x more.
INEXACT_NEWTON = Newton(CG(), forcing="superlinear")


def check_scalar_loss(owner, name, loss, w, theta):
    """`loss(w, theta)` must return a real scalar; raise naming `name` otherwise."""
    if not callable(loss):
        raise TypeError(f"{owner}: `{name}` must be callable, got {type(loss)}")
    try:
        out = jax.eval_shape(loss, w, theta)
    except Exception as e:  # the user's function, any error: say where it came from
        raise ValueError(
            f"{owner}: calling {name}(w0, theta) failed; check that w0 and theta "
            f"have the structure and shapes {name} expects: {type(e).__name__}: {e}"
        ) from e
    leaves = jax.tree.leaves(out)
    if len(leaves) != 1 or leaves[0].shape != ():
        shapes = [x.shape for x in leaves]
        raise ValueError(
            f"{owner}: `{name}` must return a scalar, got shapes {shapes} (sum or "
            "average the per-example losses)"
        )
    if not jnp.issubdtype(leaves[0].dtype, jnp.floating):
        raise TypeError(
            f"{owner}: `{name}` must return a real float, got {leaves[0].dtype}"
        )


def as_solver(solver):
    """An iterjax solver, or an optax optimiser wrapped as `OptaxSolver`."""
    if isinstance(solver, optax.GradientTransformation):
        return OptaxSolver(solver)
    return solver


def argmin(
    inner_loss: Callable[[Any, Any], ArrayLike],
    w0: Y,
    theta: Args = None,
    *,
    solver: AbstractFixedPointSolver | optax.GradientTransformation = INEXACT_NEWTON,
    adjoint: AbstractAdjoint = ImplicitAdjoint(CG()),
    atol: float = 1e-6,
    rtol: float = 0.0,
    max_steps: int = 256,
    throw: bool = False,
    norm: Norm = tu.max_abs,
) -> Solution:
    r"""Minimise `inner_loss(w, theta)` over w, differentiably in theta.

    The minimiser is the root of ∇_w g(w, θ), found by `solver` and stopped when
    |∇_w g| <= atol (+ rtol |w|). By the implicit function theorem at ∇_w g = 0,

        dw*/dθ = -H⁻¹ ∂²g/∂w∂θ,   H = ∂²g/∂w²,

    so `jax.grad` of anything computed from w* costs one linear solve with
    Hessian-vector products (forward-over-reverse JVPs; H is never formed): CG by
    default, since H is symmetric positive definite at a strict minimum. Composes
    with `jit`, `vmap` (each θ keeps its own step count) and `jvp`.

    Args:
      inner_loss: `g(w, theta) -> scalar`.
      w0: the initial guess, a pytree of float arrays.
      theta: the parameters (any pytree); gradients flow to them.
      solver: `Newton(CG(), forcing="superlinear")` (default: inexact Newton-CG
        on the gradient, each system H s = -∇g solved to min(0.5, √|∇g|)
        relative residual: 2-3x fewer HVPs than exact Newton steps on logistic
        regression, same answer),
        any iterjax fixed-point solver (on w - ∇g), or an optax optimiser
        (e.g. `optax.adam(1e-2)`), which takes the steps on ∇g.
      adjoint: `ImplicitAdjoint(CG())` (default), `ImplicitAdjoint(Neumann(k))`,
        `UnrolledAdjoint()` (backprop through the solver's steps) ...
      atol, rtol, max_steps, throw, norm: as in `iterjax.fixed_point`.

    Returns:
      A `Solution`; `value` is w*, `residual` the norm of ∇_w g(w*).

    Examples:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> X = jnp.array([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
      >>> y = jnp.array([1.0, 2.0, 3.0])
      >>> ridge = lambda w, lam: jnp.sum((X @ w - y) ** 2) + lam * jnp.sum(w**2)
      >>> w = iterjax.argmin(ridge, jnp.zeros(2), 0.1).value
      >>> bool(jnp.allclose(w, jnp.linalg.solve(X.T @ X + 0.1 * jnp.eye(2), X.T @ y)))
      True
      >>> dw = jax.jacobian(lambda lam: iterjax.argmin(ridge, jnp.zeros(2), lam).value)
      >>> dw(0.1).shape
      (2,)
    """
    check_inexact("argmin", "w0", w0)
    check_scalar_loss("argmin", "inner_loss", inner_loss, w0, theta)
    grad = jax.grad(inner_loss)
    fp = lambda w, t: tu.tree_sub(w, grad(w, t))
    sol = solve(
        "argmin",
        grad,
        fp,
        w0,
        theta,
        as_solver(solver),
        adjoint,
        False,
        atol=atol,
        rtol=rtol,
        max_steps=max_steps,
        trace=False,
        norm=norm,
    )
    # A vanishing gradient where the loss is NaN or inf is no minimiser.
    stop = jax.lax.stop_gradient
    finite = jnp.isfinite(inner_loss(stop(sol.value), stop(theta)))
    sol = sol.replace(
        converged=sol.converged & finite,
        result=jnp.where(finite, sol.result, jnp.int32(NONFINITE_LOSS)),
    )
    if throw:
        error_if_failed(sol.result, "argmin")
    return sol
