"""Bandits that tune a solver parameter from its cost: Exp3 (plain) and SquareCB
(contextual), in a lax.scan, under jit and vmap; the shifted Poisson operator."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from iterjax import lab
from iterjax.gallery import Poisson2D
from iterjax.linear import SOR, optimal_omega
from iterjax.tuning import Exp3, SquareCB
from iterjax.tuning import bandit as bandits

ARMS = (0.1, 0.3, 0.5, 0.7, 0.9)


def test_exp3_settles_on_the_best_arm_of_noisy_costs():
    # cost(arm) = |arm - 0.3| + noise: arm 1 is best by 0.2 in expectation
    def cost(value, noise):
        return jnp.abs(value - 0.3) + noise

    noise = jnp.asarray(np.random.default_rng(0).uniform(0, 0.4, 2000))
    bandit = Exp3(ARMS, max_cost=1.0, learning_rate=3.0)
    keys = jax.random.split(jax.random.PRNGKey(0), 4)
    go = lambda k: bandits.run(bandit, cost, noise, jnp.zeros(2000), k)
    arms, costs, state = jax.jit(jax.vmap(go))(keys)
    assert np.all(np.asarray(state.t) == 2000)
    assert np.mean(np.asarray(arms)[:, 1000:] == 1) > 0.9
    best = float(jnp.sum(noise))  # arm 1's cumulative cost
    k, t = len(ARMS), 2000  # Exp3's expected-regret bound, 2 sqrt(2 T K ln K)
    assert np.all(np.asarray(costs.sum(1)) < best + 2 * np.sqrt(2 * t * k * np.log(k)))
    # the probabilities are a distribution
    p = bandit.probabilities(jax.tree.map(lambda a: a[0], state))
    np.testing.assert_allclose(jnp.sum(p), 1.0, rtol=1e-12)


def test_squarecb_learns_the_policy_from_the_context():
    # the best arm is the one nearest the context c in [0, 1]
    cost = lambda value, c: jnp.abs(value - c)
    contexts = jnp.asarray(np.random.default_rng(1).uniform(0, 1, 600))
    bandit = SquareCB(ARMS, (0.0, 1.0), degree=6, exploration=10.0)
    arms, costs, _ = jax.jit(
        lambda k: bandits.run(bandit, cost, contexts, contexts, k)
    )(jax.random.PRNGKey(0))
    best = np.argmin(np.abs(np.asarray(ARMS)[:, None] - np.asarray(contexts)), 0)
    assert np.mean(np.asarray(arms)[300:] == best[300:]) > 0.8
    # and so beats the best fixed arm, which the plain bandit cannot
    fixed = min(float(jnp.sum(jnp.abs(a - contexts))) for a in ARMS)
    assert float(costs.sum()) < 0.7 * fixed


def test_a_bandit_tunes_sor_and_beats_a_random_omega():
    n = 8
    h = 1.0 / (n + 1)
    shifts = jnp.asarray(np.random.default_rng(2).uniform(0, 2 / h**2, 150))

    def cost(omega, c):
        op = Poisson2D(jnp.ones((n, n)), shift=c)
        sol = SOR(omega, atol=1e-8, max_steps=500).solve(op, jnp.ones((n, n)))
        return sol.num_steps.astype(jnp.float64)

    arms = (1.1, 1.4, 1.7, 1.95)
    table = np.asarray(
        jax.vmap(lambda w: jax.vmap(lambda c: cost(w, c))(shifts))(jnp.asarray(arms))
    )
    bandit = SquareCB(arms, (0.0, 2 / h**2), max_cost=50.0, exploration=10.0)
    _, costs, _ = jax.jit(lambda k: bandits.run(bandit, cost, shifts, shifts, k))(
        jax.random.PRNGKey(0)
    )
    assert float(costs.sum()) < table.mean(0).sum()  # a uniformly random ω's
    # once it has explored, it is near the best fixed ω (1.12x here; over 500
    # systems on a 16 x 16 grid it beats it: `sor_bandit`)
    late = slice(75, None)
    assert float(costs[late].sum()) < 1.2 * table[:, late].sum(1).min()


def test_shifted_poisson_sor_follows_young():
    # ρ_J of -Δ + c is cos(πh) d / (d + c), d = 4/h²: Gauss-Seidel's radius is its
    # square and the optimal ω's is ω* - 1
    n = 6
    h = 1.0 / (n + 1)
    c = 0.7 / h**2
    op = Poisson2D(jnp.ones((n, n)), shift=c)
    rho_j = np.cos(np.pi * h) * (4 / h**2) / (4 / h**2 + c)

    def radius(omega):
        step = SOR(omega).iteration(op, jnp.zeros((n, n)))
        m = jax.jacfwd(lambda v: step(v.reshape(n, n), None).ravel())(jnp.zeros(n * n))
        return float(jnp.max(jnp.abs(jnp.linalg.eigvals(m))))

    np.testing.assert_allclose(radius(1.0), rho_j**2, rtol=1e-10)
    omega = float(optimal_omega(rho_j))
    np.testing.assert_allclose(radius(omega), omega - 1, rtol=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: Exp3((1.0,)), "two"),
        (lambda: Exp3(ARMS, max_cost=0.0), "max_cost"),
        (lambda: Exp3(ARMS, learning_rate=-1.0), "learning_rate"),
        (lambda: SquareCB(ARMS, (1.0, 0.0)), "context_range"),
        (lambda: SquareCB(ARMS, (0.0, 1.0), degree=0), "degree"),
        (lambda: SquareCB(ARMS, (0.0, 1.0), ridge=0.0), "ridge"),
    ],
)
def test_bad_hyperparameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.slow  # an experiment's claim
def test_squarecb_is_within_10_percent_of_the_best_fixed_omega_after_200(tmp_path):
    # the issue's bar, on `sor_bandit`'s own sequence (16 x 16 screened Poisson
    # systems, 5 seeds): cumulative SOR iterations after 200 systems relative to
    # the best fixed ω of the grid in hindsight
    _, summary = lab.run("sor_bandit", out=tmp_path, systems=200)
    rows = {r["policy"]: r["vs_best_fixed"] for r in summary["rows"]}
    assert rows["squarecb (contextual)"] <= 1.1, rows
    assert rows["uniformly random ω"] > 1.5, rows  # the choice of ω matters here
