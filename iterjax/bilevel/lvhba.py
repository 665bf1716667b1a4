r"""LV-HBA: constrained bilevel problems through a proximal Lagrangian value
function, single loop and Hessian-free (Yao et al. 2024, "Constrained bi-level
optimization: proximal Lagrangian value function approach and Hessian-free
algorithm").

The problem: min_{θ, w} F(w, θ) over w ∈ S(θ) = argmin_w {f(w, θ) : c(w, θ) ≤ 0}
(a lower level with its own constraints; F = `outer_loss`, f = `inner_loss`,
c = `constraint`, a vector). The proximal Lagrangian value function

    v(θ, w, z) = min_u max_{λ ≥ 0} f(u, θ) + λᵀc(u, θ) + |u - w|²/(2γ₁) - γ₂|λ - z|²/2

is smooth, and S(θ) is the set where f(w, θ) - v(θ, w, z) ≤ 0 (with c ≤ 0), so
the bilevel problem becomes one level with a penalty c_k on that gap. Each
step, one gradient step of every variable, no Hessian:

    u ← u - η (∇_u f(u, θ) + ∇_u c(u, θ)ᵀλ + (u - w)/γ₁)        (the value's min)
    λ ← Π_[0,r](λ + η (c(u, θ) - (λ - z)/γ₂))                     (its max)
    d_θ = ∇_θ F/c_k + ∇_θ f(w, θ) - ∇_θ f(u, θ) - ∇_θ c(u, θ)ᵀλ
    d_w = ∇_w F/c_k + ∇_w f(w, θ) - (w - u)/γ₁
    z ← Π_[0,r](z + β (λ - z)/γ₂)
    (w, θ) ← project(w - α d_w, θ updated by the optax optimiser on d_θ)

with c_k = `penalty` · (k + 1)^`growth` growing, α = `inner_lr`, η = `value_lr`,
β = `multiplier_lr`, and `project` the projection onto the feasible set
C = {(w, θ): c(w, θ) ≤ 0}, which the method needs (as the paper assumes). The
upper objective enters as F/c_k, so the error decays like 1/c_k.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_range
from ._stochastic import _info, _Stochastic, _with_finite


class LVHBAState(NamedTuple):
    """LV-HBA's own variables (`BilevelState.aux`): the proximal point u of the
    value function, its multipliers λ ≥ 0 and their proximal centre z ≥ 0."""

    u: Any
    lam: jax.Array
    z: jax.Array


class LVHBA(_Stochastic):
    """The Lagrangian-value-function Hessian-free bilevel algorithm.

    Attributes:
      inner_loss, outer_loss, outer_optimizer: as for `SOBA` (the lower-level
        objective f, the upper F, the optimiser of θ; its step is LV-HBA's α_θ).
      constraint: `c(w, theta, batch) -> array`, the lower level's constraints
        c ≤ 0 (one multiplier each).
      project: `(w, theta) -> (w, theta)`, the projection onto the feasible set
        C = {(w, θ): c(w, θ) ≤ 0} (and any set of θ). Required: the value-function
        gap makes w a lower-level solution only within C; off C nothing holds w.
      inner_lr: α, the step of w.
      value_lr: η, the step of the value function's u and λ.
      multiplier_lr: β, the step of z.
      gamma1, gamma2: the proximal parameters γ₁, γ₂ > 0.
      penalty, growth: c_k = penalty · (k + 1)^growth, growth in [0, 1/2).
      multiplier_bound: r, λ and z are kept in [0, r] (the paper's compact Z).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, iterjax
      >>> f = lambda w, t, b: 0.5 * jnp.sum((w - t) ** 2)  # w*(θ) = max(θ, 0)
      >>> c = lambda w, t, b: -w  # the lower level's constraint w ≥ 0
      >>> F = lambda w, t, b: 0.5 * jnp.sum((w - jnp.array([2.0, -1.0])) ** 2)
      >>> project = lambda w, t: (jnp.maximum(w, 0.0), t)  # onto {c ≤ 0}
      >>> solver = iterjax.bilevel.LVHBA(
      ...     f, F, optax.sgd(0.05), constraint=c, project=project, inner_lr=0.05
      ... )
      >>> state = solver.init(jnp.zeros(2), jnp.zeros(2))
      >>> step = jax.jit(solver.step)
      >>> for _ in range(3000):
      ...     state, _ = step(state, None, None)
      >>> print(jnp.round(state.w, 1))  # w* = (2, 0): the second at its bound
      [2. 0.]
    """

    constraint: Any = struct.field(pytree_node=False, default=None, kw_only=True)
    project: Any = struct.field(pytree_node=False, kw_only=True)
    value_lr: float = struct.field(default=0.05, kw_only=True)
    multiplier_lr: float = struct.field(default=0.05, kw_only=True)
    gamma1: float = struct.field(default=10.0, kw_only=True)
    gamma2: float = struct.field(default=10.0, kw_only=True)
    penalty: float = struct.field(default=1.0, kw_only=True)
    growth: float = struct.field(default=0.3, kw_only=True)
    multiplier_bound: float = struct.field(default=1e3, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        if not callable(self.constraint):
            raise TypeError("LVHBA: `constraint` must be callable c(w, theta, batch)")
        if not callable(self.project):
            raise TypeError(
                "LVHBA: `project` must be callable (w, theta) -> (w, theta), the "
                "projection onto the feasible set {c(w, theta) <= 0}"
            )
        positive = ("value_lr", "multiplier_lr", "gamma1", "gamma2", "penalty")
        for name in positive + ("multiplier_bound",):
            check_range("LVHBA", name, getattr(self, name), lo=0.0, lo_open=True)
        check_range("LVHBA", "growth", self.growth, lo=0.0, hi=0.5, hi_open=True)

    @property
    def oracles(self) -> tuple[float, float]:
        """(gradients, HVPs) per step: ∇f at u and w (each with ∇_θ), ∇F, and the
        constraint's value and vector-Jacobian product at u; no HVP."""
        return (5, 0)

    def init(self, theta, w0):
        c0 = jnp.asarray(self.constraint(w0, theta, None))
        lam = jnp.zeros(jnp.shape(c0), c0.dtype)
        return self._init(theta, w0, LVHBAState(w0, lam, lam))

    def step(self, state, inner_batch=None, outer_batch=None):
        self._check_batches(inner_batch, outer_batch)
        f, F, con = self.inner_loss, self.outer_loss, self.constraint
        theta, w, (u, lam, z) = state.theta, state.w, state.aux
        dtype = lam.dtype
        g1, g2 = self.gamma1, self.gamma2

        def lagrangian(u, t):  # f + λᵀc at (u, θ)
            return f(u, t, inner_batch) + jnp.sum(lam * con(u, t, inner_batch))

        # the value function's proximal min-max: one descent-ascent step
        l_u, l_t = jax.grad(lagrangian, (0, 1))(u, theta)
        u = tu.tree_axpy(
            -self.value_lr, tu.tree_axpy(1.0 / g1, tu.tree_sub(u, w), l_u), u
        )
        lam = jnp.clip(
            lam + self.value_lr * (con(u, theta, inner_batch) - (lam - z) / g2),
            0.0,
            self.multiplier_bound,
        )
        # the penalised single-level problem's directions
        c_k = self.penalty * (state.step.astype(dtype) + 1) ** self.growth
        F_w, F_t = jax.grad(F, (0, 1))(w, theta, outer_batch)
        f_w, f_t = jax.grad(f, (0, 1))(w, theta, inner_batch)
        d_t = tu.tree_add(tu.tree_scale(1.0 / c_k, F_t), tu.tree_sub(f_t, l_t))
        d_w = tu.tree_axpy(
            1.0 / c_k, F_w, tu.tree_axpy(-1.0 / g1, tu.tree_sub(w, u), f_w)
        )
        z = jnp.clip(
            z + self.multiplier_lr * (lam - z) / g2, 0.0, self.multiplier_bound
        )
        w = tu.tree_axpy(-self.inner_lr, d_w, w)
        new = self._outer_update(state, d_t, w, LVHBAState(u, lam, z))
        w, theta = self.project(new.w, new.theta)
        return _with_finite(new._replace(w=w, theta=theta), _info(*self.oracles))
