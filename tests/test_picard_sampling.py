"""Picard (ParaDiGMS) DDIM sampling equals sequential DDIM; gradients w.r.t. the
initial noise through the whole chain match lax.scan's (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iterjax as ij
from iterjax.experiments import diffusion

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
