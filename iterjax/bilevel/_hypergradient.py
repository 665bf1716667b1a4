r"""Hypergradients of bilevel problems, by five methods, each reporting its cost.

The problem: minimise F(θ) = f(w*(θ), θ) with w*(θ) = argmin_w g(w, θ). Its
gradient (the hypergradient), where H = ∂²g/∂w² at w*:

    ∇F = ∇_θ f - (∂²g/∂θ∂w) H⁻¹ ∇_w f.

`hypergradient(outer_loss, inner_loss, theta, w0, method=...)` computes it (or an
approximation) by:

* `Implicit(linear_solver)`: solve the inner problem to tolerance, then H v = ∇_w f
  matrix-free (CG, Neumann, Richardson ...), ∇F = ∇_θ f - ∂_θ<∇_w g, v>.
* `Unrolled(optimizer, steps)`: K optimiser steps from w0, reverse-mode through all
  of them (memory O(K)).
* `Truncated(optimizer, steps, truncate)`: K steps, reverse-mode through the last T
  only (Shaban et al. 2019): memory O(T), bias shrinking geometrically in T.
* `Forward(optimizer, steps)`: the same K steps in forward mode, one JVP pass per
  coordinate of θ (memory O(1) in K, cost O(K dim θ)).
* `Penalty(optimizer, steps, lam)`: first order only, no second derivatives
  (F2SA, Kwon et al. 2023): z ≈ argmin g, y ≈ argmin f/λ + g, and
  ∇F ≈ ∇_θ f(y) + λ (∇_θ g(y) - ∇_θ g(z)), with error O(1/λ).

Several lower-level solutions (Kwon et al. 2023, "On penalty methods for
nonconvex bilevel optimization"): where g(·, θ) is minimised on a set S(θ), the
(optimistic) problem is F(θ) = min over w ∈ S(θ) of f(w, θ), attained at the
selection y*(θ), and under the paper's regularity conditions on g

    ∇F = ∇_θ f - (∂²g/∂θ∂w) H† ∇_w f   at y*,  H† the pseudo-inverse.

`Implicit(CG())` started at w0 = y* computes it: ∇_w f lies in range(H) there,
and CG from 0 on the consistent singular system gives H†∇_w f. At another
point of S the system has no solution, and the result is NaN and not
converged. `Penalty` needs no selection: its y → y* as λ grows, and its
estimate is O(1/λ) from ∇F (both tested on a line of minimisers).

Costs are counted per method: `inner_grads` (∇_w g), `outer_grads` (∇ f),
`hvps` (Hessian- or mixed-second-derivative-vector products, including those of a
reverse pass through an optimiser step).
"""

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import _struct as struct
from .. import _tree as tu
from .._checks import (
    check_inexact,
    check_int,
    check_range,
    check_same_structure,
    check_scalar_loss,
)
from .._module import Module
from .._optax import optax_init, optax_step
from .._solution import error_if_failed, result_code
from .._types import Array, Bool, Float, Int
from ..linear import CG, AbstractLinearSolver
from ._argmin import argmin


class HyperGrad(NamedTuple):
    """The result of `hypergradient`."""

    grad: Any  # ∇F(θ), like theta
    value: Float[Array, ""]  # f(w, θ) at the inner solution the method used
    w: Any  # that inner solution
    cost: dict  # inner_grads, outer_grads, hvps (int32 arrays)
    converged: Bool[Array, ""]  # inner (and linear) solves reached tolerance
    result: Int[Array, ""]  # code: 0 success, 1 max steps reached, 2 non-finite


def _cost(inner_grads, outer_grads, hvps):
    as_int = lambda n: jnp.asarray(n, jnp.int32)
    return dict(
        inner_grads=as_int(inner_grads),
        outer_grads=as_int(outer_grads),
        hvps=as_int(hvps),
    )


class AbstractMethod(Module):
    """How `hypergradient` computes ∇F (floats are leaves, ints static)."""

    @abc.abstractmethod
    def __call__(self, outer_loss, inner_loss, theta, w0) -> HyperGrad:
        """The hypergradient at θ, from the inner start w0."""


class Implicit(AbstractMethod):
    """Implicit differentiation at the solved inner problem.

    Attributes:
      linear_solver: for H v = ∇_w f: `CG()` (default; H must be positive
        definite: otherwise reported as a failure), `Neumann(k)`, `Richardson()`
        (both need the spectrum of H inside (0, 2): scale the inner loss),
        `GMRES()`, `BiCGStab()`.
      solver: the inner solver (as in `argmin`; default None: line-search
        inexact Newton-CG).
      atol, max_steps, norm: the inner solve's tolerance on |∇_w g| (in `norm`,
        default the max norm) and step cap.
    """

    linear_solver: AbstractLinearSolver = struct.field(pytree_node=False, default=CG())
    solver: Any = struct.field(pytree_node=False, default=None)
    atol: float = 1e-10
    max_steps: int = struct.field(pytree_node=False, default=256)
    norm: Any = struct.field(pytree_node=False, default=tu.max_abs)

    def __post_init__(self):
        if not isinstance(self.linear_solver, AbstractLinearSolver):
            raise TypeError(
                "Implicit: `linear_solver` must be an iterjax linear solver, got "
                f"{self.linear_solver!r}"
            )
        check_range("Implicit", "atol", self.atol, lo=0.0)
        check_int("Implicit", "max_steps", self.max_steps, 1)

    def __call__(self, outer_loss, inner_loss, theta, w0):
        # w*(θ) through argmin's implicit adjoint, and v through a
        # custom_linear_solve: the hypergradient is itself differentiable (the
        # hyper-Hessian: jacfwd, jacrev, hessian of F), at no cost to first order.
        sol = argmin(
            inner_loss,
            w0,
            theta,
            solver=self.solver,
            atol=self.atol,
            max_steps=self.max_steps,
            norm=self.norm,
            curvature_steps=0,  # CG below meets any negative curvature in its space
        )
        w = sol.value
        value, (f_w, f_theta) = jax.value_and_grad(outer_loss, (0, 1))(w, theta)
        grad_w = jax.grad(inner_loss)
        _, hvp = jax.linearize(lambda w: grad_w(w, theta), w)
        solve = lambda mv, b: self.linear_solver.solve_loop(mv, b)
        v, lin = jax.lax.custom_linear_solve(
            hvp, f_w, solve, symmetric=True, has_aux=True
        )
        _, vjp = jax.vjp(lambda t: grad_w(w, t), theta)
        grad = tu.tree_sub(f_theta, vjp(v)[0])
        newton_jvps = jnp.maximum(sol.stats.get("jvps", 0), 0)
        cost = _cost(sol.num_steps + 1, 1, lin.num_matvecs + 1 + newton_jvps)
        ok = sol.converged & lin.converged & ~lin.breakdown
        # the inner solve's own failure code (e.g. a NaN loss) wins
        result = jnp.where(sol.converged, _result(ok, grad), sol.result)
        return HyperGrad(grad, value, w, cost, ok, result)


def _result(ok, grad):
    return result_code(ok, jnp.isfinite(tu.max_abs(grad)))


def _optimise(optimizer, loss, w0, theta, steps, state=None):
    """`steps` optax steps on loss(·, theta) from w0 (and optimiser `state`, fresh
    when None): a differentiable scan. Returns (w, state)."""
    if state is None:
        state = optax_init(optimizer, w0)

    def step(carry, _):
        w, state = carry
        return optax_step(optimizer, jax.grad(loss)(w, theta), state, w), None

    (w, state), _ = jax.lax.scan(step, (w0, state), length=steps)
    return w, state


class _Unrolling(AbstractMethod):
    """A fixed number of optax steps on the inner problem."""

    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    steps: int = struct.field(pytree_node=False, default=100)
    atol: float = struct.field(default=1e-6, kw_only=True)

    def __post_init__(self):
        name = type(self).__name__
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError(
                f"{name}: `optimizer` must be an optax.GradientTransformation, "
                f"got {type(self.optimizer).__name__}"
            )
        check_int(name, "steps", self.steps, 1)
        check_range(name, "atol", self.atol, lo=0.0)

    def _objective(self, outer_loss, inner_loss, w_start, steps, state=None):
        """θ -> (outer_loss(w_K(θ), θ), w_K(θ)), w_K after `steps` steps."""

        def objective(theta):
            w, _ = _optimise(self.optimizer, inner_loss, w_start, theta, steps, state)
            return outer_loss(w, theta), w

        return objective

    def _finish(self, inner_loss, theta, w, grad, value, cost):
        # Converged: the K steps reached a stationary inner point, |∇_w g| <= atol.
        theta = jax.lax.stop_gradient(theta)
        gnorm = tu.max_abs(jax.grad(inner_loss)(jax.lax.stop_gradient(w), theta))
        ok = gnorm <= self.atol
        return HyperGrad(grad, value, w, cost, ok, _result(ok, grad))


class Unrolled(_Unrolling):
    """Reverse mode through `steps` optimiser steps (memory grows with steps).

    Attributes:
      optimizer: an optax optimiser for the inner problem, e.g. `optax.sgd(0.1)`.
      steps: K >= 1.
      atol: `converged` reports |∇_w g(w_K)| <= atol (the steps sufficed).
    """

    def __call__(self, outer_loss, inner_loss, theta, w0):
        objective = self._objective(outer_loss, inner_loss, w0, self.steps)
        (value, w), grad = jax.value_and_grad(objective, has_aux=True)(theta)
        cost = _cost(self.steps, 1, self.steps)
        return self._finish(inner_loss, theta, w, grad, value, cost)


class Truncated(_Unrolling):
    """K optimiser steps, reverse mode through the last `truncate` only.

    Attributes:
      optimizer, steps, atol: as for `Unrolled`.
      truncate: T in [1, steps]: the number of differentiated steps.
    """

    truncate: int = struct.field(pytree_node=False, default=10)

    def __post_init__(self):
        super().__post_init__()
        check_int("Truncated", "truncate", self.truncate, 1)
        if self.truncate > self.steps:
            raise ValueError(
                f"Truncated: `truncate` ({self.truncate}) must not exceed `steps` "
                f"({self.steps})"
            )

    def __call__(self, outer_loss, inner_loss, theta, w0):
        head = self.steps - self.truncate
        theta_s = jax.lax.stop_gradient(theta)
        mid = _optimise(self.optimizer, inner_loss, w0, theta_s, head)
        w_mid, state = jax.lax.stop_gradient(mid)
        objective = self._objective(outer_loss, inner_loss, w_mid, self.truncate, state)
        (value, w), grad = jax.value_and_grad(objective, has_aux=True)(theta)
        cost = _cost(self.steps, 1, self.truncate)
        return self._finish(inner_loss, theta, w, grad, value, cost)


class Forward(_Unrolling):
    """Forward mode through `steps` optimiser steps: one JVP pass per coordinate
    of θ (`jax.jacfwd`), memory independent of the number of steps.

    Attributes:
      optimizer, steps, atol: as for `Unrolled`.
    """

    def __call__(self, outer_loss, inner_loss, theta, w0):
        objective = self._objective(outer_loss, inner_loss, w0, self.steps)
        grad, w = jax.jacfwd(objective, has_aux=True)(theta)
        p = sum(jnp.size(x) for x in jax.tree.leaves(theta))
        cost = _cost(self.steps, 1, self.steps * p)
        return self._finish(inner_loss, theta, w, grad, outer_loss(w, theta), cost)


class Penalty(_Unrolling):
    """First-order penalty / value-function hypergradient (F2SA), no second
    derivatives: z ≈ argmin g, y ≈ argmin (f/λ + g), each by `steps` optimiser
    steps from w0, and

        ∇F ≈ ∇_θ f(y, θ) + λ (∇_θ g(y, θ) - ∇_θ g(z, θ)),

    whose error is O(1/λ) when both inner problems are solved (Kwon et al. 2023).

    Attributes:
      optimizer, steps, atol: as for `Unrolled` (for both inner problems).
      lam: λ > 0, the penalty.
    """

    lam: float = 100.0

    def __post_init__(self):
        super().__post_init__()
        check_range("Penalty", "lam", self.lam, lo=0.0, lo_open=True)

    def __call__(self, outer_loss, inner_loss, theta, w0):
        theta_s = jax.lax.stop_gradient(theta)
        lam = self.lam
        penalised = lambda w, t: outer_loss(w, t) / lam + inner_loss(w, t)
        z, _ = _optimise(self.optimizer, inner_loss, w0, theta_s, self.steps)
        y, _ = _optimise(self.optimizer, penalised, w0, theta_s, self.steps)
        z, y = jax.lax.stop_gradient(z), jax.lax.stop_gradient(y)

        def lagrangian(t):
            return outer_loss(y, t) + lam * (inner_loss(y, t) - inner_loss(z, t))

        grad = jax.grad(lagrangian)(theta)
        value = outer_loss(z, theta)
        # y's steps evaluate ∇f and ∇g; the final gradient ∇f and two ∇g.
        cost = _cost(2 * self.steps + 2, self.steps + 1, 0)
        return self._finish(inner_loss, theta, z, grad, value, cost)


_SGD = optax.sgd(0.1)
METHODS = {
    "implicit": Implicit(),
    "unrolled": Unrolled(_SGD, 100),
    "truncated": Truncated(_SGD, 100, 10),
    "forward": Forward(_SGD, 100),
    "penalty": Penalty(_SGD, 100, lam=100.0),
}


def hypergradient(
    outer_loss,
    inner_loss,
    theta,
    w0,
    *,
    method: AbstractMethod | str = Implicit(),
    throw: bool = False,
    return_info: bool = False,
):
    """∇_θ of outer_loss(w*(θ), θ) with w*(θ) = argmin_w inner_loss(w, θ).

    Args:
      outer_loss: `f(w, theta) -> scalar` (validation loss, ...).
      inner_loss: `g(w, theta) -> scalar` (regularised training loss, ...).
      theta: the hyperparameters, a pytree of float arrays.
      w0: the inner initial guess, a pytree of float arrays.
      method: `Implicit(CG())` (default), `Unrolled`, `Truncated`, `Forward` or
        `Penalty` (see the module docstring), or one of their names
        ("implicit", "unrolled", "truncated", "forward", "penalty") for the
        defaults in `METHODS` (the unrolling ones: 100 steps of `optax.sgd(0.1)`).
      throw: raise when the inner or linear solve failed (under jit: a runtime
        error), instead of only reporting it in `converged` / `result`.
      return_info: return the `HyperGrad` (gradient, value, inner solution,
        cost, convergence) instead of the gradient alone.

    Returns:
      ∇F(θ), like theta; or with `return_info=True` a `HyperGrad`: `grad`,
      `value`, `w`, `cost`, `converged`, `result`. Works under `jit` and `vmap`
      (over theta or w0).

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> inner = lambda w, t: jnp.sum((w - 1.0) ** 2) + jnp.exp(t) * jnp.sum(w**2)
      >>> outer = lambda w, t: jnp.sum((w - 0.8) ** 2)
      >>> g = iterjax.hypergradient(outer, inner, jnp.array(0.0), jnp.zeros(3))
      >>> round(float(g), 6)  # closed form: 0.45
      0.45
      >>> hg = iterjax.hypergradient(outer, inner, jnp.array(0.0), jnp.zeros(3),
      ...                            method="penalty", return_info=True)
      >>> round(float(hg.grad), 2), int(hg.cost["hvps"])  # first order: no HVPs
      (0.45, 0)
    """
    if isinstance(method, str):
        if method not in METHODS:
            raise ValueError(
                f"hypergradient: unknown method {method!r}; names: {sorted(METHODS)}"
            )
        method = METHODS[method]
    if not isinstance(method, AbstractMethod):
        raise TypeError(
            "hypergradient: `method` must be Implicit, Unrolled, Truncated, Forward "
            f"or Penalty (or one of their names), got {method!r}"
        )
    check_inexact("hypergradient", "theta", theta)
    check_inexact("hypergradient", "w0", w0)
    check_scalar_loss("hypergradient", "inner_loss", inner_loss, w0, theta)
    check_scalar_loss("hypergradient", "outer_loss", outer_loss, w0, theta)
    g = jax.eval_shape(jax.grad(inner_loss), w0, theta)
    check_same_structure("hypergradient", "∇_w inner_loss", g, tu.tree_structs(w0))
    out = method(outer_loss, inner_loss, theta, w0)
    if throw:
        error_if_failed(out.result, "hypergradient")
    return out if return_info else out.grad


__all__ = [
    "AbstractMethod",
    "Forward",
    "HyperGrad",
    "Implicit",
    "Penalty",
    "Truncated",
    "Unrolled",
    "hypergradient",
]
