r"""BO-REP: bilevel optimisation under unbounded smoothness (Hao, Gong & Liu 2024).

The upper level F(θ) = f(w*(θ), θ) need not be L-smooth: only (L₀, L₁)-smooth,
‖∇²F‖ ≤ L₀ + L₁ ‖∇F‖ (recurrent networks, θ⁴-like growth), where SGD with a
fixed step diverges from far away. BO-REP takes normalised-momentum steps on θ,

    m ← β m + (1 - β) d,    θ ← θ - η m / ‖m‖,

(`normalized_momentum`, an optax transform), so a step never exceeds η however
large the gradient. The hypergradient estimate is SOBA's, d = ∇_θ f + ∂²_θw g v,
with v tracking -H⁻¹ ∇_w f by one step v ← v - ν (H v + ∇_w f) a step. The lower
level is **refined at initialisation** (`init_steps` SGD steps on w at the first
step) and then **updated periodically**: `inner_steps` SGD steps every `period`
outer steps, not at every step, since normalised steps move θ, hence w*(θ), by
at most η a step.
"""

import jax
import jax.numpy as jnp
import optax

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from ._stochastic import _sgd, _soba_directions, _Stochastic, _with_finite


def normalized_momentum(
    learning_rate: float | optax.Schedule, beta: float = 0.9, eps: float = 1e-12
) -> optax.GradientTransformation:
    """Normalised momentum: m ← β m + (1 - β) d, update -η m / (‖m‖ + eps), the
    norm over the whole pytree (BO-REP's and (L₀, L₁)-smooth optimisation's upper
    step). `learning_rate` may be an optax schedule.

    Examples:
      >>> import jax.numpy as jnp, optax, iterjax
      >>> opt = iterjax.bilevel.normalized_momentum(0.1, beta=0.0)
      >>> updates, _ = opt.update(jnp.array([300.0, 400.0]), opt.init(jnp.zeros(2)))
      >>> print(jnp.round(updates, 6))  # a step of length η, whatever the gradient
      [-0.06 -0.08]
    """
    check_range("normalized_momentum", "beta", beta, lo=0.0, hi=1.0, hi_open=True)
    check_range("normalized_momentum", "eps", eps, lo=0.0)
    if not callable(learning_rate):
        check_range(
            "normalized_momentum", "learning_rate", learning_rate, lo=0.0, lo_open=True
        )
    return optax.chain(
        optax.ema(beta, debias=False),
        optax.normalize_by_update_norm(eps=eps),
        optax.scale_by_learning_rate(learning_rate),
    )


class BOREP(_Stochastic):
    """Bilevel optimisation with initialisation refinement and periodic updates.

    Attributes:
      inner_loss, outer_loss: `loss(w, theta, batch) -> scalar`.
      outer_optimizer: the upper step; the paper's is `normalized_momentum(η, β)`.
      inner_lr: the step size of w's SGD steps and of v's step (ν).
      init_steps: SGD steps on w at the first step (initialisation refinement).
      inner_steps: SGD steps on w at every `period`-th step after the first.
      period: I, the outer steps between two lower-level updates.

    `info["grads"]` counts the step's own gradients (the SGD steps it took plus
    ∇f), so it varies; `oracles` is the long-run mean per step.

    Examples:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> g = lambda w, t, b: 0.5 * jnp.sum((w - t) ** 2)  # w*(θ) = θ
      >>> f = lambda w, t, b: 0.25 * jnp.sum(w**4)  # F(θ) = Σθ⁴/4: unbounded smoothness
      >>> opt = iterjax.bilevel.normalized_momentum(0.05, beta=0.5)
      >>> solver = iterjax.bilevel.BOREP(g, f, opt, inner_lr=0.5, period=2)
      >>> state = solver.init(jnp.array([30.0]), jnp.zeros(1))
      >>> step = jax.jit(solver.step)
      >>> for _ in range(800):
      ...     state, info = step(state, None, None)
      >>> print(abs(float(state.theta[0])) < 1.0)  # SGD would diverge from 30
      True
    """

    init_steps: int = struct.field(pytree_node=False, default=100)
    inner_steps: int = struct.field(pytree_node=False, default=10)
    period: int = struct.field(pytree_node=False, default=5)

    def __post_init__(self):
        super().__post_init__()
        check_int("BOREP", "init_steps", self.init_steps, 0)
        check_int("BOREP", "inner_steps", self.inner_steps, 1)
        check_int("BOREP", "period", self.period, 1)

    @property
    def oracles(self) -> tuple[float, float]:
        """(gradients, HVPs) per step on average over a period (the initial
        refinement's `init_steps` aside), each on a minibatch of each loss."""
        return (1 + self.inner_steps / self.period, 2)

    def init(self, theta, w0):
        return self._init(theta, w0, tu.tree_zeros_like(w0))

    def step(self, state, inner_batch=None, outer_batch=None):
        self._check_batches(inner_batch, outer_batch)
        g, f, nu = self.inner_loss, self.outer_loss, self.inner_lr
        theta, w, v = state.theta, state.w, state.aux
        k = state.step
        # 0: no update, 1: periodic, 2: the initial refinement; a switch of
        # loops with static trip counts, so that reverse mode goes through it
        branch = jnp.where(k == 0, 2, jnp.where(k % self.period == 0, 1, 0))
        counts = (0, self.inner_steps, self.init_steps)
        refine = lambda n: lambda w: _sgd(g, w, theta, inner_batch, nu, n)
        w = jax.lax.switch(branch, [refine(n) for n in counts], w)
        n = jnp.asarray(counts, jnp.int32)[branch]
        d_v, d_t = _soba_directions(g, f, w, theta, v, inner_batch, outer_batch)
        v = tu.tree_axpy(-nu, d_v, v)
        info = {"grads": n + 1, "hvps": jnp.int32(2)}
        return _with_finite(self._outer_update(state, d_t, w, v), info)
