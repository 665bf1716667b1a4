"""`argmin`: the minimiser of an inner loss, differentiable in its parameters."""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .. import _tree as tu
from .._checks import check_inexact, check_int, check_scalar_loss
from .._iterate import AbstractFixedPointSolver
from .._solution import NONFINITE_LOSS, NOT_A_MINIMUM, Solution, error_if_failed
from .._solve import solve
from .._types import Args, ArrayLike, Norm, Y
from ..fixed_point import Backtracking, Newton
from ..fixed_point.optax_solver import OptaxSolver
from ..implicit import AbstractAdjoint, ImplicitAdjoint
from ..linear import CG
from ..linear.preconditioners import lanczos_bounds

# Each Newton system to η_k = min(0.5, √|∇g|) relative residual (scipy's Newton-CG):
# the fewest Hessian-vector products in benchmarks/bilevel.py. A fixed 1e-1 takes
# 3 more steps and 13-27% more products on logistic regression, Eisenstat-Walker
# forcing 15-40% more, exact steps 2-3x more. CG stops at negative curvature with
# a descent direction (not NaN): `newton_cg` searches along it.
INEXACT_NEWTON = Newton(CG(indefinite="truncate"), forcing="superlinear")


def newton_cg(inner_loss, theta):
    """argmin's default solver: line-search inexact Newton-CG on `inner_loss(·,
    theta)` (Nocedal & Wright 2006, Algorithm 7.1): `INEXACT_NEWTON`'s steps,
    shortened until the loss falls by the Armijo rule, a gradient step where
    the Newton-CG step is no descent direction."""
    return Backtracking(INEXACT_NEWTON, objective=lambda w: inner_loss(w, theta))


def lowest_curvature(grad, w, theta, steps):
    """The lowest Ritz value of `steps` Lanczos steps on the Hessian at w, from a
    fixed random start, and the tolerance below which it is negative curvature.

    Ritz values are Rayleigh quotients v'Hv of unit vectors, so a negative one
    proves negative curvature (a saddle point or a maximum); a positive one does
    not prove a minimum (a few steps may miss a direction). The tolerance is
    √eps times the largest |Ritz value|: flat directions are not negative ones.
    """
    hvp = lambda v: jax.jvp(lambda u: grad(u, theta), (w,), (v,))[1]
    flat, unravel = tu.ravel(w)
    start = unravel(jax.random.normal(jax.random.key(0), flat.shape, flat.dtype))
    lo, hi = lanczos_bounds(hvp, start, steps)
    eps = jnp.finfo(lo.dtype).eps
    scale = jnp.maximum(jnp.abs(lo), jnp.abs(hi))
    return lo, jnp.sqrt(eps) * scale


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
    solver: AbstractFixedPointSolver | optax.GradientTransformation | None = None,
    adjoint: AbstractAdjoint = ImplicitAdjoint(CG()),
    atol: float = 1e-6,
    rtol: float = 0.0,
    max_steps: int = 256,
    throw: bool = False,
    norm: Norm = tu.max_abs,
    curvature_steps: int = 3,
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
      solver: None (default: line-search inexact Newton-CG, `newton_cg`: each
        system H s = -∇g solved by CG to min(0.5, √|∇g|) relative residual,
        2-3x fewer HVPs than exact Newton steps on logistic regression; CG
        stops at negative curvature with a descent direction; the step is
        shortened until g falls (Armijo), so a non-convex g is minimised from
        any start, where plain Newton-CG breaks down),
        any iterjax fixed-point solver (on w - ∇g; `Backtracking(...,
        objective=...)` globalises one), or an optax optimiser (e.g.
        `optax.adam(1e-2)`), which takes the steps on ∇g.
      adjoint: `ImplicitAdjoint(CG())` (default), `ImplicitAdjoint(Neumann(k))`,
        `UnrolledAdjoint()` (backprop through the solver's steps) ...
      atol, rtol, max_steps, throw, norm: as in `iterjax.fixed_point`.
      curvature_steps: Lanczos steps (Hessian-vector products) of a probe for
        negative curvature at the answer (0: none). A stationary point where it
        finds some is reported as `result` 5, not converged: a saddle point or
        a maximum, where the implicit gradient is not valid. The probe can miss
        a direction; it never flags a minimum. `stats["curvature"]` is the
        lowest curvature it saw.

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
    check_int("argmin", "curvature_steps", curvature_steps, 0)
    check_inexact("argmin", "w0", w0)
    check_scalar_loss("argmin", "inner_loss", inner_loss, w0, theta)
    grad = jax.grad(inner_loss)
    fp = lambda w, t: tu.tree_sub(w, grad(w, t))
    if solver is None:
        solver = newton_cg(inner_loss, theta)
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
    # A vanishing gradient where the loss is NaN or inf, or where it curves down,
    # is no minimiser.
    w, t = jax.lax.stop_gradient((sol.value, theta))
    finite = jnp.isfinite(inner_loss(w, t))
    saddle, stats = jnp.bool_(False), sol.stats
    if curvature_steps:
        lowest, tolerance = lowest_curvature(grad, w, t, curvature_steps)
        saddle = sol.converged & (lowest < -tolerance)
        stats = stats | {"curvature": lowest}
    result = jnp.where(saddle, jnp.int32(NOT_A_MINIMUM), sol.result)
    sol = sol.replace(
        converged=sol.converged & finite & ~saddle,
        result=jnp.where(finite, result, jnp.int32(NONFINITE_LOSS)),
        stats=stats,
    )
    if throw:
        error_if_failed(sol.result, "argmin")
    return sol
