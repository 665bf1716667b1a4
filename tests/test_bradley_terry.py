"""Bradley-Terry: both iterations against scipy's maximum likelihood and choix,
every solver, jit, vmap, gradients, bad input."""

import choix
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.optimize
from jax.test_util import check_grads

import iterjax as ij
from iterjax.classical import bradley_terry, strongly_connected

CASES = {
    "newman": ("newman", ij.Picard()),
    "zermelo": ("zermelo", ij.Picard()),
    "newman-anderson": ("newman", ij.Anderson()),
    "zermelo-anderson": ("zermelo", ij.Anderson()),
}


def _wins(n=12, p=0.6, games=3, spread=1.5, seed=0):
    """Random comparisons of players with scores N(0, spread^2), resampled
    until the graph is strongly connected."""
    rng = np.random.default_rng(seed)
    s = rng.normal(0, spread, n)
    while True:
        w = np.zeros((n, n))
        for i in range(n):
            for j in range(i + 1, n):
                if rng.uniform() < p:
                    k = rng.binomial(games, 1 / (1 + np.exp(s[j] - s[i])))
                    w[i, j], w[j, i] = k, games - k
        if strongly_connected(w):
            return jnp.asarray(w)


def _scipy_mle(w):
    """argmax of the log-likelihood Σ w_ij log σ(s_i - s_j), mean zero."""
    w = np.asarray(w)

    def nll(s):
        d = s[:, None] - s[None, :]
        p = 1 / (1 + np.exp(-d))
        return -np.sum(w * np.log(p)), -(np.sum(w * (1 - p), 1) - np.sum(w.T * p, 1))

    out = scipy.optimize.minimize(
        nll, np.zeros(len(w)), jac=True, method="BFGS", options={"gtol": 1e-12}
    )
    return out.x - out.x.mean()


@pytest.mark.parametrize("name", CASES)
def test_scores_are_the_maximum_likelihood(name):
    w = _wins()
    iteration, solver = CASES[name]
    sol = bradley_terry(w, iteration=iteration, solver=solver, atol=1e-12)
    assert bool(sol.converged)
    s = sol.value
    np.testing.assert_allclose(jnp.mean(s), 0.0, atol=1e-13)
    # the likelihood equations W_i = Σ_j n_ij σ(s_i - s_j)
    expected = jnp.sum((w + w.T) * jax.nn.sigmoid(s[:, None] - s[None, :]), 1)
    np.testing.assert_allclose(expected, w.sum(1), atol=1e-10)
    np.testing.assert_allclose(s, _scipy_mle(w), atol=1e-6)


def test_two_players_cycle_under_picard_and_converge_by_default():
    # Newman's simultaneous update reflects log(π_0/π_1) about the answer log 2
    w = jnp.array([[0.0, 2.0], [1.0, 0.0]])
    plain = bradley_terry(w, solver=ij.Picard(), atol=1e-12, max_steps=100)
    assert not bool(plain.converged)
    for solver in (ij.Anderson(), ij.Relaxed(ij.Picard(), 0.5)):
        sol = bradley_terry(w, solver=solver, atol=1e-12)
        assert bool(sol.converged)
        np.testing.assert_allclose(sol.value, [np.log(2) / 2, -np.log(2) / 2])


def test_newman_takes_fewer_steps_than_zermelo():
    w = _wins(30, p=0.2, spread=2.0, seed=1)
    kw = dict(atol=1e-10, max_steps=100000, solver=ij.Picard())
    newman = bradley_terry(w, iteration="newman", **kw)
    zermelo = bradley_terry(w, iteration="zermelo", **kw)
    assert 3 * int(newman.num_steps) < int(zermelo.num_steps)
    np.testing.assert_allclose(newman.value, zermelo.value, atol=1e-8)


@pytest.mark.parametrize("iteration", ["newman", "zermelo"])
def test_same_scores_as_choix(iteration):
    w = _wins(15, seed=2)
    n = len(w)
    data = [(i, j) for i in range(n) for j in range(n) for _ in range(int(w[i, j]))]
    reference = choix.ilsr_pairwise(n, data, tol=1e-14)
    sol = bradley_terry(w, iteration=iteration, atol=1e-12, max_steps=10000)
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.value, reference - reference.mean(), atol=1e-8)


def test_jit_and_vmap_over_comparison_graphs():
    ws = jnp.stack([_wins(seed=3), _wins(seed=4, spread=3.0)])
    solve = lambda w: bradley_terry(w, atol=1e-12, max_steps=10000)
    out = jax.jit(jax.vmap(solve))(ws)
    for i in range(2):
        one = solve(ws[i])
        assert int(out.num_steps[i]) == int(one.num_steps)
        np.testing.assert_allclose(out.value[i], one.value, atol=1e-12)
    assert int(out.num_steps[0]) != int(out.num_steps[1])


@pytest.mark.parametrize("name", CASES)
def test_gradients_with_respect_to_the_counts(name):
    # counts kept positive and the diagonal zero under finite differences
    w = _wins(6, p=1.0) + 0.5 * (1 - jnp.eye(6))
    iteration, solver = CASES[name]
    loss = lambda w, adjoint=ij.ImplicitAdjoint(): jnp.sum(
        jnp.sin(
            bradley_terry(
                w * (1 - jnp.eye(6)),
                iteration=iteration,
                solver=solver,
                atol=1e-13,
                adjoint=adjoint,
            ).value
        )
    )
    check_grads(loss, (w,), order=1, modes=["rev"], atol=1e-6)
    unrolled = jax.grad(lambda w: loss(w, ij.UnrolledAdjoint()))(w)
    np.testing.assert_allclose(jax.grad(loss)(w), unrolled, atol=1e-9)


@pytest.mark.parametrize(
    "wins, kwargs, match",
    [
        (jnp.ones((2, 3)), {}, "square"),
        (jnp.array([[0.0, -1.0], [1.0, 0.0]]), {}, ">= 0"),
        (jnp.array([[1.0, 1.0], [1.0, 0.0]]), {}, "zero diagonal"),
        (jnp.array([[0.0, 1.0], [0.0, 0.0]]), {}, "not strongly connected"),
        (jnp.array([[0.0, 1.0], [1.0, 0.0]]), {"iteration": "hunter"}, "iteration"),
    ],
)
def test_bad_input_raises(wins, kwargs, match):
    with pytest.raises(ValueError, match=match):
        bradley_terry(wins, **kwargs)


def test_two_groups_that_never_meet_raise():
    w = np.zeros((4, 4))
    w[0, 1] = w[1, 0] = w[2, 3] = w[3, 2] = 1.0
    assert not strongly_connected(w)
    w[1, 2] = 1.0  # 1 beat 2, but nobody of {2, 3} beat one of {0, 1}
    assert not strongly_connected(w)
    w[3, 0] = 1.0
    assert strongly_connected(w)
    w[1, 2] = w[3, 0] = 0.0
    with pytest.raises(ValueError, match=r"players \[2, 3\]"):
        bradley_terry(w)


def test_integer_counts_raise():
    with pytest.raises(TypeError, match="float"):
        bradley_terry(jnp.array([[0, 1], [1, 0]]))
