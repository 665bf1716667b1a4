r"""V-PBGD: value-function penalty for lower levels with several minimisers
(Shen & Chen 2023, "On penalty methods for nonconvex bilevel optimization and
first-order stochastic approximation").

When g(·, θ) has a set S(θ) of minimisers (a line, a plane: g only PL, not
strongly convex), the bilevel problem takes the optimistic selection,
F(θ) = min_{w ∈ S(θ)} f(w, θ). V-PBGD solves the penalised single-level problem

    min_{θ, y}  f(y, θ) + γ (g(y, θ) - v(θ)),    v(θ) = min_z g(z, θ),

whose values and stationary points are O(1/γ)-close to the bilevel problem's
(σ = 1/γ: O(σ)-close). Each step takes `inner_steps` SGD steps of z on g (so
that v̂ = g(z, θ) ≈ v(θ)), `y_steps` steps of y on f/γ + g, and an outer step on

    d = ∇_θ f(y, θ) + γ (∇_θ g(y, θ) - ∇_θ g(z, θ)),

first-order only: no Hessian, no inverse. `inner_steps = y_steps = 1` is the
single-loop form (one step of each variable per step). `project`, when given,
is the projection onto the lower level's constraint set Y (projected steps).
The exact hypergradient at the optimistic selection y*, with the Hessian's
pseudo-inverse (the paper's formula for several minimisers), is
`hypergradient(..., method=Implicit(CG()))` started at y*.
"""

from typing import Any

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._checks import check_int, check_range
from ._stochastic import _info, _Stochastic, _with_finite
from .f2sa import _penalty_step


class VPBGD(_Stochastic):
    """Value-function-based penalised bilevel gradient descent.

    Attributes:
      inner_loss, outer_loss, outer_optimizer: as for `SOBA`.
      inner_lr: η, the step size of z (on g) and of y (on f/γ + g).
      gamma: the penalty γ > 0 (error O(1/γ)).
      inner_steps: SGD steps of z per outer step (warm-started); 1: single loop.
      y_steps: steps of y per outer step (1: the joint step of the paper).
      project: the projection onto Y, `w -> w` (None: unconstrained).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, iterjax
      >>> a, c = jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0])
      >>> g = lambda w, t, b: 0.5 * (a @ w - t[0]) ** 2  # S(θ): the line a·w = θ
      >>> f = lambda w, t, b: 0.5 * jnp.sum((w - c) ** 2) + 0.5 * jnp.sum(t**2)
      >>> solver = iterjax.bilevel.VPBGD(
      ...     g, f, optax.sgd(0.1), inner_lr=0.2, gamma=100.0, y_steps=20
      ... )
      >>> state = solver.init(jnp.array([3.0]), jnp.zeros(2))
      >>> step = jax.jit(solver.step)
      >>> for _ in range(300):
      ...     state, _ = step(state, None, None)
      >>> # F(θ) = (θ + 1)²/10 + θ²/2, θ* = -1/6; the penalty's: -γ/(6γ + 1)
      >>> print(round(float(state.theta[0]), 4))
      -0.1664
    """

    gamma: float = 100.0
    inner_steps: int = struct.field(pytree_node=False, default=5)
    y_steps: int = struct.field(pytree_node=False, default=1)
    project: Any = struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        super().__post_init__()
        check_range("VPBGD", "gamma", self.gamma, lo=0.0, lo_open=True)
        check_int("VPBGD", "inner_steps", self.inner_steps, 1)
        check_int("VPBGD", "y_steps", self.y_steps, 1)
        if self.project is not None and not callable(self.project):
            raise TypeError("VPBGD: `project` must be callable or None")

    @property
    def oracles(self) -> tuple[float, float]:
        """(gradients, HVPs) per step, each on a minibatch of each loss."""
        return (self.inner_steps + 2 * self.y_steps + 3, 0)

    def init(self, theta, w0):
        return self._init(theta, w0, w0)

    def step(self, state, inner_batch=None, outer_batch=None):
        self._check_batches(inner_batch, outer_batch)
        gamma = jnp.asarray(self.gamma, jax.tree.leaves(state.w)[0].dtype)
        steps = (self.inner_steps, self.y_steps)
        z, y, d_t = _penalty_step(
            self,
            state.theta,
            state.w,
            state.aux,
            gamma,
            steps,
            inner_batch,
            outer_batch,
            self.project,
        )
        info = _info(*self.oracles)
        return _with_finite(self._outer_update(state, d_t, z, y), info)
