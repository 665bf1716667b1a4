"""A 2-D diffusion model with a closed-form denoiser, and its DDIM sampler as a
recurrence for `iterjax.scan`.

The data distribution is a Gaussian mixture: a point set (two moons) blurred by
a bandwidth h. Under the variance-preserving forward process
x_t = a_t x_0 + s_t ε (a_t² + s_t² = 1) the posterior mean is exact:

    E[x_0 | x_t] = Σ_i w_i(x_t) (μ_i + a_t h² / v_t (x_t - a_t μ_i)),
    w_i ∝ exp(-|x_t - a_t μ_i|² / (2 v_t)),    v_t = a_t² h² + s_t²,

so sampling needs no trained network, and sequential DDIM is the reference.
"""

import jax
import jax.numpy as jnp
import numpy as np

BETA_MIN, BETA_MAX = 0.1, 20.0


def moons(n, noise=0.05, seed=0):
    """Two interleaved half circles (as sklearn's make_moons), standardised."""
    rng = np.random.default_rng(seed)
    k = n // 2
    a, b = np.pi * rng.random(k), np.pi * rng.random(n - k)
    upper = np.stack([np.cos(a), np.sin(a)], 1)
    lower = np.stack([1 - np.cos(b), 0.5 - np.sin(b)], 1)
    x = np.concatenate([upper, lower]) + noise * rng.standard_normal((n, 2))
    return (x - x.mean(0)) / x.std(0)


def alpha_bar(t):
    """ᾱ(t) = a_t² of the VP-SDE with a linear β schedule, t in [0, 1]."""
    return jnp.exp(-(BETA_MIN * t + 0.5 * (BETA_MAX - BETA_MIN) * t**2))


def schedule(num_steps, t_min=1e-3):
    """Per DDIM step, the pair (ᾱ at t_k, ᾱ at t_{k+1}) from t = 1 down to t_min:
    the `xs` of the sampling scan, shape [num_steps, 2]."""
    ab = alpha_bar(jnp.linspace(1.0, t_min, num_steps + 1))
    return jnp.stack([ab[:-1], ab[1:]], axis=1)


def denoise(points, bandwidth, x, ab):
    """E[x_0 | x_t = x] for samples x [S, 2] at ᾱ = ab (see the module docstring)."""
    a, s2 = jnp.sqrt(ab), 1 - ab
    v = a**2 * bandwidth**2 + s2
    diff = x[:, None, :] - a * points[None]  # [S, n, 2]
    w = jax.nn.softmax(-jnp.sum(diff**2, -1) / (2 * v), axis=-1)  # [S, n]
    return w @ points + (a * bandwidth**2 / v) * jnp.sum(w[..., None] * diff, 1)


def ddim_step(points, bandwidth):
    """The deterministic DDIM step x_k -> x_{k+1} as a `lax.scan` body over the
    `schedule` (carry: samples [S, 2]; output: none)."""

    def f(x, abs_):
        ab, ab_next = abs_[0], abs_[1]
        x0 = denoise(points, bandwidth, x, ab)
        eps = (x - jnp.sqrt(ab) * x0) / jnp.sqrt(1 - ab)
        return jnp.sqrt(ab_next) * x0 + jnp.sqrt(1 - ab_next) * eps, None

    return f
