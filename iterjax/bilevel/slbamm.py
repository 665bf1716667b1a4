r"""sl-BAMM: the single-loop bilevel averaged method of multipliers (Liu et al.
2023, "Averaged method of multipliers for bi-level optimization without
lower-level strong convexity").

When g(·, θ) is only convex, its minimisers form a set and SOBA's lower-level
step picks one of them at random (by its start). sl-BAMM steps w on the
**average** of the two levels' objectives, with a weight μ_k on the upper one
that decays to 0,

    w ← w - ρ ((1 - μ_k) ∇_w g(w, θ) + μ_k ∇_w f(w, θ)),    μ_k = μ (k + 1)^(-p),

so that among g's minimisers w drifts to the one that is best for f (the
optimistic selection), then takes SOBA's multiplier step and hypergradient at
the new w:

    v ← v - ρ (H v + ∇_w f),    d = ∇_θ f + ∂²_θw g v,

and θ's step by the optax optimiser on d: one loop, Hessian-vector products
only, no inverse.
"""

import jax

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_range
from ._stochastic import _grad_w, _info, _soba_directions, _with_finite
from .soba import SOBA


class SLBAMM(SOBA):
    """Single-loop bilevel averaged method of multipliers: SOBA with w's step on
    the averaged objective.

    Attributes:
      inner_loss, outer_loss, outer_optimizer: as for `SOBA`.
      inner_lr: ρ, the step size of w and v.
      mu: μ ∈ (0, 1), the upper objective's initial weight in w's step.
      mu_decay: p > 0, μ_k = μ (k + 1)^(-p).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, iterjax
      >>> # g ignores w[1]: its minimisers are the line w[0] = θ; f picks w[1] = θ
      >>> g = lambda w, t, b: 0.5 * w[0] ** 2 - t[0] * w[0]
      >>> f = lambda w, t, b: 0.5 * (t[0] - w[1]) ** 2 + 0.5 * (w[0] - 1.0) ** 2
      >>> solver = iterjax.bilevel.SLBAMM(g, f, optax.sgd(0.2), inner_lr=0.5)
      >>> state = solver.init(jnp.zeros(1), jnp.zeros(2))
      >>> step = jax.jit(solver.step)
      >>> for _ in range(2000):
      ...     state, _ = step(state, None, None)
      >>> print(jnp.round(state.theta, 2), jnp.round(state.w, 2))  # θ* = 1, w* = (1, 1)
      [1.] [1. 1.]
    """

    mu: float = struct.field(default=0.5, kw_only=True)
    mu_decay: float = struct.field(default=0.5, kw_only=True)

    def __post_init__(self):
        super().__post_init__()
        check_range("SLBAMM", "mu", self.mu, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
        check_range("SLBAMM", "mu_decay", self.mu_decay, lo=0.0, lo_open=True)

    @property
    def oracles(self) -> tuple[int, int]:
        """(gradients, HVPs) per step: ∇g and ∇f for w's step, ∇f at the new w;
        H v and the cross product."""
        return (3, 2)

    def step(self, state, inner_batch=None, outer_batch=None):
        self._check_batches(inner_batch, outer_batch)
        g, f, rho = self.inner_loss, self.outer_loss, self.inner_lr
        theta, w, v = state.theta, state.w, state.aux
        k = state.step.astype(jax.tree.leaves(w)[0].dtype)
        mu = self.mu * (k + 1) ** (-self.mu_decay)
        averaged = tu.tree_axpy(
            mu,
            _grad_w(f, w, theta, outer_batch),
            tu.tree_scale(1 - mu, _grad_w(g, w, theta, inner_batch)),
        )
        w = tu.tree_axpy(-rho, averaged, w)
        d_v, d_t = _soba_directions(g, f, w, theta, v, inner_batch, outer_batch)
        v = tu.tree_axpy(-rho, d_v, v)
        return _with_finite(self._outer_update(state, d_t, w, v), _info(*self.oracles))
