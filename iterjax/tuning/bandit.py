"""Learning a solver parameter across a sequence of systems, from its cost alone.

Khodak et al. (2024), "Learning to Relax: Setting Solver Parameters Across a
Sequence of Linear System Instances": a solver with a parameter (SOR's ω) is
run on systems A_1, A_2, ...; after each one only its cost is seen (the
iteration count). An online learner that picks the parameter from a grid of
`arms` has cumulative cost close to that of the best fixed arm in hindsight
(the plain bandit), or, given a context c_t per system (e.g. a diagonal shift),
close to the best policy c -> arm of a regression class (the contextual one).

Both are pure: `init(key)` gives a state, `choose(state, context)` an arm and
its probability, `update(state, arm, prob, cost, context)` the next state; so a
`lax.scan` over the systems runs them (`run`), under `jit` and `vmap` (over
seeds). Costs are divided by `max_cost` and clipped to [0, 1].
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._checks import check_range
from .._types import Array, Int, PRNGKeyArray


class BanditState(NamedTuple):
    estimates: jax.Array  # Exp3: (K,) importance-weighted cumulative losses;
    # SquareCB: (K, d, d + 1) ridge statistics [Σ φφᵀ + λI | Σ φ ℓ] per arm
    key: PRNGKeyArray  # the PRNG key of the next draw
    t: Int[Array, ""]  # systems seen


def _check(owner, arms, max_cost):
    if len(arms) < 2:
        raise ValueError(f"{owner}: `arms` needs at least two values, got {arms}")
    check_range(owner, "max_cost", max_cost, lo=0.0, lo_open=True)


class Exp3(struct.PyTreeNode):
    """The plain bandit: Exp3 with implicit exploration (Exp3-IX; Neu 2015).

        p_t = softmax(-η_t L̂_t),   draw a_t ~ p_t,   see ℓ_t ∈ [0, 1],
        L̂_{t+1} = L̂_t + e_{a_t} ℓ_t / (p_t(a_t) + γ_t),

    with η_t = lr · sqrt(2 log K / (K (t + 1))) and γ_t = η_t / (2 lr): expected
    regret O(sqrt(T K log K)) against the best fixed arm. (Learning to Relax uses
    Tsallis-INF; on `sor_bandit`'s systems it locked onto poor arms more often
    than Exp3-IX, so iterjax ships the latter.)

    Attributes:
      arms: the K parameter values (e.g. SOR's ω grid).
      max_cost: costs are divided by it (e.g. the solver's `max_steps`).
      learning_rate: lr, a factor on η_t (> 0).
    """

    arms: tuple[float, ...] = struct.field(pytree_node=False)
    max_cost: float = 1.0
    learning_rate: float = 1.0

    def __post_init__(self):
        _check("Exp3", self.arms, self.max_cost)
        check_range("Exp3", "learning_rate", self.learning_rate, lo=0.0, lo_open=True)

    def init(self, key):
        return BanditState(jnp.zeros(len(self.arms)), key, jnp.int32(0))

    def _eta(self, t):
        k = len(self.arms)
        return jnp.sqrt(2 * jnp.log(k) / (k * (t + 1).astype(float)))

    def probabilities(self, state, context=None):
        return jax.nn.softmax(
            -self.learning_rate * self._eta(state.t) * state.estimates
        )

    def choose(self, state, context=None):
        """`(arm index, its probability, state)`."""
        p = self.probabilities(state, context)
        key, draw = jax.random.split(state.key)
        arm = jax.random.choice(draw, len(self.arms), p=p)
        return arm, p[arm], state._replace(key=key)

    def update(self, state, arm, prob, cost, context=None):
        loss = jnp.clip(cost / self.max_cost, 0.0, 1.0)
        gamma = self._eta(state.t) / 2
        estimates = state.estimates.at[arm].add(loss / (prob + gamma))
        return BanditState(estimates, state.key, state.t + 1)


class SquareCB(struct.PyTreeNode):
    """The contextual bandit: SquareCB (Foster & Rakhlin 2020) on per-arm ridge
    regressions of the cost on Chebyshev features of the context, the
    regression-oracle learner of Learning to Relax (its ChebCB).

    Features φ(c) = (T_0(u), ..., T_{d-1}(u)), u the context mapped from
    `context_range` to [-1, 1]. Each arm's predicted cost is ŷ_a = θ_aᵀ φ(c), θ_a
    the ridge solution of its past (φ, ℓ). With b = argmin ŷ, arms are drawn by
    inverse-gap weighting,

        p_a = 1 / (K + γ_t (ŷ_a - ŷ_b))  (a ≠ b),   p_b = 1 - Σ_{a≠b} p_a,

    γ_t = `exploration` · sqrt(K (t + 1)): ever greedier as the regressions firm
    up.

    Attributes:
      arms: the K parameter values.
      context_range: (lo, hi) of the contexts.
      degree: d, the number of Chebyshev features (>= 1).
      max_cost: costs are divided by it.
      ridge: λ > 0.
      exploration: the factor on γ_t (> 0).
    """

    arms: tuple[float, ...] = struct.field(pytree_node=False)
    context_range: tuple[float, float] = struct.field(pytree_node=False)
    degree: int = struct.field(pytree_node=False, default=4)
    max_cost: float = 1.0
    ridge: float = 1e-2
    exploration: float = 1.0

    def __post_init__(self):
        _check("SquareCB", self.arms, self.max_cost)
        lo, hi = self.context_range
        if not lo < hi:
            raise ValueError(
                f"SquareCB: `context_range` must be (lo, hi) with lo < hi, "
                f"got {self.context_range}"
            )
        if self.degree < 1:
            raise ValueError(f"SquareCB: `degree` must be >= 1, got {self.degree}")
        check_range("SquareCB", "ridge", self.ridge, lo=0.0, lo_open=True)
        check_range("SquareCB", "exploration", self.exploration, lo=0.0, lo_open=True)

    def features(self, context):
        lo, hi = self.context_range
        u = jnp.clip(2 * (context - lo) / (hi - lo) - 1, -1.0, 1.0)
        return jnp.cos(jnp.arange(self.degree, dtype=u.dtype) * jnp.arccos(u))  # T_j

    def init(self, key):
        gram = self.ridge * jnp.eye(self.degree)
        stats = jnp.concatenate([gram, jnp.zeros((self.degree, 1))], axis=1)
        stats = jnp.broadcast_to(stats, (len(self.arms), *stats.shape))
        return BanditState(stats, key, jnp.int32(0))

    def predictions(self, state, context):
        """The predicted (normalised) cost of every arm at `context`."""
        phi = self.features(context)
        gram, moments = state.estimates[..., :-1], state.estimates[..., -1]
        theta = jnp.linalg.solve(gram, moments[..., None])[..., 0]
        return theta @ phi

    def probabilities(self, state, context):
        y = self.predictions(state, context)
        k = len(self.arms)
        gamma = self.exploration * jnp.sqrt(k * (state.t + 1).astype(float))
        best = jnp.argmin(y)
        p = 1 / (k + gamma * (y - y[best]))
        p = p.at[best].set(0.0)
        return p.at[best].set(1 - jnp.sum(p))

    def choose(self, state, context):
        p = self.probabilities(state, context)
        key, draw = jax.random.split(state.key)
        arm = jax.random.choice(draw, len(self.arms), p=p)
        return arm, p[arm], state._replace(key=key)

    def update(self, state, arm, prob, cost, context):
        loss = jnp.clip(cost / self.max_cost, 0.0, 1.0)
        phi = self.features(context)
        row = jnp.concatenate([jnp.outer(phi, phi), (phi * loss)[:, None]], axis=1)
        return BanditState(state.estimates.at[arm].add(row), state.key, state.t + 1)


def run(bandit, cost, systems, contexts, key):
    """Run `bandit` over a sequence of systems in one `lax.scan`.

    Args:
      bandit: `Exp3` or `SquareCB`.
      cost: `cost(arm_value, system) -> scalar` (e.g. SOR's iteration count).
      systems: a pytree whose leaves have the systems along axis 0.
      contexts: (N,) contexts (ignored by `Exp3`; pass zeros).
      key: a PRNG key.

    Returns:
      `(arms, costs, state)`: the arm index and the cost at every system, and
      the final state.
    """
    values = jnp.asarray(bandit.arms)

    def step(state, item):
        system, context = item
        arm, prob, state = bandit.choose(state, context)
        c = cost(values[arm], system)
        return bandit.update(state, arm, prob, c, context), (arm, c)

    state, (arms, costs) = jax.lax.scan(
        step, bandit.init(key), (systems, jnp.asarray(contexts))
    )
    return arms, costs, state
