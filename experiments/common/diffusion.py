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


def paradigms(f, z, xs, window, tol):
    """ParaDiGMS's sliding-window loop (Shih et al. 2023, Algorithm 1) for an ODE
    sampler, restated as the reference `picard_diffusion` and
    `benchmarks/sequence_peers.py` compare with: each pass evaluates the steps of
    a window in parallel, takes the Picard update (the prefix sums of the
    drifts), and slides the window past the prefix of steps whose update is
    within `tol` (largest component) plus one more step; the window shrinks at
    the end of the chain, so a pass evaluates only steps not yet accepted.

    Returns (states s_1..s_N, passes, model evaluations). The blocks are padded
    to `window` steps so that one compiled step serves every pass; only the
    window's real steps count as evaluations.
    """
    T = xs.shape[0]
    W = min(window, T)
    step = jax.jit(jax.vmap(lambda c, x: f(c, x)[0]))
    pad = jnp.concatenate([xs, jnp.repeat(xs[-1:], W, 0)])
    buf = np.repeat(np.asarray(z)[None], T + W + 1, 0)  # buf[t]: after t steps
    begin, end, passes, evaluations = 0, W, 0, 0
    while begin < T:
        n = end - begin
        old = buf[begin : begin + W]
        drift = np.asarray(step(jnp.asarray(old), pad[begin : begin + W])) - old
        new = buf[begin][None] + np.cumsum(drift[:n], 0)
        change = np.abs(new - buf[begin + 1 : end + 1]).reshape(n, -1).max(1)
        converged = int(np.argmax(np.append(change > tol, True)))
        buf[begin + 1 : end + 1] = new
        next_begin = begin + min(1 + converged, W)
        next_end = min(next_begin + W, T)
        buf[end : next_end + 1] = buf[end][None]
        begin, end = next_begin, next_end
        passes, evaluations = passes + 1, evaluations + n
    return buf[1 : T + 1], passes, evaluations
