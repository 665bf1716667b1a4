"""Picard (ParaDiGMS) DDIM sampling equals sequential DDIM; gradients w.r.t. the
initial noise through the whole chain match lax.scan's (float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import iterjax as ij
from iterjax.experiments.common import diffusion
from iterjax.experiments.common import digits_diffusion as dd

N = 200


@pytest.fixture(scope="module")
def chain():
    points = jnp.asarray(diffusion.moons(32, seed=0))
    f = diffusion.ddim_step(points, 0.05)
    z = jax.random.normal(jax.random.key(0), (2, 8, 2))  # two batches of noise
    return f, diffusion.schedule(N), z, points


def sequential(f, xs, z):
    return jax.lax.scan(f, z, xs)[0]


@pytest.mark.parametrize("window", [None, 24])
def test_picard_sampling_equals_sequential_ddim_batched(chain, window):
    f, xs, z, _ = chain
    method = ij.sequence.Picard(window)

    @jax.jit
    @jax.vmap
    def sample(z):
        x, _, stats = ij.scan(f, z, xs, method=method, atol=1e-10, return_stats=True)
        return x, stats

    x, stats = sample(z)
    ref = jax.vmap(lambda z: sequential(f, xs, z))(z)
    np.testing.assert_allclose(x, ref, atol=1e-6, rtol=0)
    assert bool(jnp.all(stats.converged))
    assert int(jnp.max(stats.num_sweeps)) <= N // 4  # ParaDiGMS: far below N
    # The samples are not the noise: 200 DDIM steps moved them onto the moons.
    dist = jnp.linalg.norm(x[0][:, None] - chain[3][None], axis=-1).min(1)
    assert float(jnp.max(dist)) < 0.2


def test_gradient_wrt_the_initial_noise_matches_lax_scan(chain):
    f, xs, z, points = chain
    target = points[:8, 0]
    loss = lambda x: jnp.sum((x[:, 0] - target) ** 2)
    picard = lambda z: ij.scan(f, z, xs, method=ij.sequence.Picard(), atol=1e-12)[0]
    g = jax.jit(jax.grad(lambda z: loss(picard(z))))(z[0])
    ref = jax.grad(lambda z: loss(sequential(f, xs, z)))(z[0])
    np.testing.assert_allclose(g, ref, rtol=1e-6, atol=1e-9)
    assert float(jnp.linalg.norm(ref)) > 1e-3


@pytest.mark.parametrize("window", [8, 24, N])
def test_paradigms_acceptance_is_the_paradigms_loop(chain, window):
    # acceptance="paradigms": the loop's own passes, evaluations and states
    f, xs, z, _ = chain
    tol = 1e-6
    X, passes, evaluations = diffusion.paradigms(f, z[0], xs, window, tol)
    g = lambda c, x: (f(c, x)[0], c)  # ys: the solved states s_0..s_{T-1}

    @functools.partial(jax.jit, static_argnums=1)
    def solve(z, acceptance):
        method = ij.sequence.Picard(window)
        kw = dict(method=method, atol=tol, return_stats=True)
        return ij.scan(g, z, xs, acceptance=acceptance, **kw)

    last, ys, stats = solve(z[0], "paradigms")
    assert bool(stats.converged)
    assert int(stats.num_sweeps) == passes
    assert int(stats.evaluations) == evaluations
    states = jnp.concatenate([ys[1:], last[None]])
    np.testing.assert_allclose(states, X, atol=1e-12, rtol=0)
    # the tested rule (residual and update) takes at least as many
    _, _, tested = solve(z[0], "tested")
    assert int(tested.evaluations) > evaluations
    assert int(tested.num_sweeps) >= passes
    # per element under vmap, as the single solves
    batched = jax.vmap(lambda z: solve(z, "paradigms")[2].num_sweeps)(z)
    assert int(batched[0]) == passes
    assert int(batched[1]) == int(solve(z[1], "paradigms")[2].num_sweeps)


def test_acceptance_must_be_a_known_rule(chain):
    f, xs, z, _ = chain
    g = lambda c, x: (f(c, x)[0],) * 2
    with pytest.raises(ValueError, match="acceptance.*'tested' or 'paradigms'"):
        ij.scan(g, z[0], xs, acceptance="residual")


@pytest.mark.parametrize("acceptance", ["tested", "paradigms"])
def test_a_nan_of_f_stops_either_rule_as_non_finite(acceptance):
    f = lambda h, x: (jnp.where(x > 5, jnp.nan, 0.5 * h + x), h)
    xs = jnp.arange(10.0)
    method = ij.sequence.Picard()
    _, ys, stats = ij.scan(
        f, 0.0, xs, method=method, acceptance=acceptance, return_stats=True
    )
    assert int(stats.result) == 2 and int(stats.num_sweeps) < 10
    np.testing.assert_allclose(ys[:7], jax.lax.scan(f, 0.0, xs)[1][:7])
    assert bool(jnp.all(jnp.isnan(ys[7:])))


# --- the trained digits model's measures (experiments.common.digits_diffusion) ---


def test_frechet_distance_of_gaussians_is_the_closed_form():
    # N(0, I) against N(m, 4 I) in 3-D: |m|² + Tr(I + 4I - 2·2I) = |m|² + 3
    rng = np.random.default_rng(0)
    a = rng.standard_normal((200_000, 3))
    m = np.array([1.0, -2.0, 0.5])
    b = m + 2 * rng.standard_normal((200_000, 3))
    assert dd.frechet_distance(a, b) == pytest.approx(m @ m + 3, rel=2e-2)
    assert dd.frechet_distance(a, a) == pytest.approx(0.0, abs=1e-8)


def test_sliced_wasserstein_of_a_translated_set_is_the_mean_projected_shift():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((500, 64))
    v = np.full(64, 0.1)
    # every projection shifts by v·θ: SW² = mean (v·θ)² = |v|² / d for random θ
    assert dd.sliced_wasserstein(a, a) == 0.0
    got = dd.sliced_wasserstein(a, a + v, projections=4000)
    assert got == pytest.approx(np.linalg.norm(v) / 8, rel=0.05)


def test_digits_models_round_trip_through_a_checkpoint(tmp_path):
    cfg = dd.ModelConfig(hidden=8, layers=2, frequencies=2)
    denoiser = dd.Denoiser(cfg, nnx.Rngs(3))
    classifier = dd.Classifier(nnx.Rngs(4), hidden=128)
    dd.save(denoiser, classifier, tmp_path)
    d2, c2 = dd.load(tmp_path)
    x = jnp.ones((2, 64), jnp.float32)
    np.testing.assert_array_equal(d2(x, 0.5), denoiser(x, 0.5))
    np.testing.assert_array_equal(c2(x), classifier(x))
