"""Diffusion samplers as step maps: the chain that `iterjax.scan` solves in parallel.

A variance-preserving diffusion model is x_t = α_t x_0 + σ_t ε with α_t² = ᾱ_t and
σ_t² = 1 - ᾱ_t, and a network ε̂(x, t) that predicts the noise; its data
prediction is x̂_0(x, t) = (x - σ_t ε̂(x, t)) / α_t. An N-step sampler from t_0
(noise) to t_N (data) is the recurrence

    c_{k+1} = step(c_k, s_k),    k = 0 .. N-1,

with c the sampler's carry (the sample x, plus the history a multistep method
keeps) and s_k the per-step inputs (`SamplerSteps`: the times t_k, t_{k+1} and
their ᾱ). So `jax.lax.scan(sampler.step, sampler.init(z), steps)` is sequential
sampling, and `iterjax.scan` with `Picard` (ParaDiGMS, Shih et al. 2023),
`Jacobi`, `GaussSeidel` or `QuasiDEER` solves the same chain in parallel, to
`scan`'s stated bound of the sequential samples. Multistep samplers carry their
history of model outputs, which a step replaces rather than increments: give
Picard `diagonal=sampler.increments(z)` so that it takes prefix sums of the
sample's increments only and Jacobi updates of the history (DreamPropeller's
generalised Picard, Zhou et al. 2024); plain Picard would need a sweep a step.

Samplers (deterministic, η = 0):

* `ddim`: x_{k+1} = α_{k+1} x̂_0 + σ_{k+1} ε̂ (Song et al. 2021).
* `plms`: PNDM's pseudo linear multistep (Liu et al. 2022): the DDIM transfer
  with the Adams-Bashforth combination ε' = (55 ε̂_k - 59 ε̂_{k-1} + 37 ε̂_{k-2}
  - 9 ε̂_{k-3}) / 24. PNDM starts with three pseudo Runge-Kutta steps (four model
  calls each); here the first three steps use the Adams-Bashforth formulas of
  order 1, 2 and 3 instead (as iPNDM, Zhang & Chen 2023), so every step is one
  model call.
* `dpm_solver_pp`: DPM-Solver++(2M) (Lu et al. 2022, Algorithm 2), second order
  in the log-SNR λ = log(α/σ), on data predictions; its first step is DDIM.

Example (a closed-form model: data N(0, c² I), whose ε̂ is exact):

    >>> import jax.numpy as jnp, iterjax
    >>> from iterjax.sequence import samplers
    >>> c2 = 0.25
    >>> eps = lambda x, t, ab: jnp.sqrt(1 - ab) * x / (ab * c2 + 1 - ab)
    >>> times = jnp.linspace(1.0, 1e-3, 21)
    >>> steps = samplers.sampler_steps(times, jnp.exp(-10 * times))
    >>> s, z = samplers.dpm_solver_pp(eps), jnp.ones(2)
    >>> picard = iterjax.sequence.Picard(diagonal=s.increments(z))
    >>> c, _ = iterjax.scan(s.step, s.init(z), steps, method=picard, atol=1e-10)
    >>> round(float(s.sample(c)[0]), 3)  # exact: sqrt(v(1e-3) / v(1)) = 0.507
    0.5
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax.numpy as jnp
import numpy as np

from .._checks import concrete_number
from .._types import Array, Float, Int

__all__ = [
    "Sampler",
    "SamplerSteps",
    "sampler_steps",
    "ddim",
    "plms",
    "dpm_solver_pp",
    "ddim_transfer",
]


class SamplerSteps(NamedTuple):
    """Per-step inputs of a sampler (the `xs` of the scan), each of shape [N].

    Attributes:
      t, t_next: the step's times t_k and t_{k+1} (what the model is conditioned on).
      alpha_bar, alpha_bar_next: ᾱ at t_k and t_{k+1}.
      alpha_bar_prev: ᾱ at t_{k-1} (at t_0 for the first step), for multistep methods.
      k: the step number k.
    """

    t: Float[Array, " N"]
    t_next: Float[Array, " N"]
    alpha_bar: Float[Array, " N"]
    alpha_bar_next: Float[Array, " N"]
    alpha_bar_prev: Float[Array, " N"]
    k: Int[Array, " N"]


class Sampler(NamedTuple):
    """A sampler as a recurrence (optax-style: a pair of pure functions and a read-out).

    Attributes:
      init: noise x_{t_0} -> the initial carry.
      step: (carry, s: `SamplerSteps` row) -> (next carry, None): one sampler step,
        one model call. The scan body of `jax.lax.scan` or `iterjax.scan`.
      sample: carry -> the sample x it holds.
      increments: noise -> a pytree like the carry, 1.0 on the sample (which
        a step increments) and 0.0 on a multistep method's history (which a step
        replaces): the `diagonal` of `iterjax.sequence.Picard`, without which
        Picard needs as many sweeps as steps on a multistep sampler.
    """

    init: Callable[[Any], Any]
    step: Callable[[Any, SamplerSteps], tuple[Any, None]]
    sample: Callable[[Any], Any]
    increments: Callable[[Any], Any]


def sampler_steps(times, alpha_bar) -> SamplerSteps:
    """The `SamplerSteps` of the chain t_0 -> t_1 -> ... -> t_N.

    Args:
      times: the N + 1 times t_0 (noise) .. t_N (data), shape [N + 1].
      alpha_bar: ᾱ at those times, shape [N + 1], each in (0, 1): ᾱ(t_0) near 0
        (pure noise), ᾱ(t_N) near 1; or a function t -> ᾱ(t).

    Raises ValueError naming the argument when the shapes differ, fewer than two
    times are given, or a concrete ᾱ is outside (0, 1) or NaN.
    """
    times = jnp.asarray(times)
    ab = jnp.asarray(alpha_bar(times) if callable(alpha_bar) else alpha_bar)
    if times.ndim != 1 or times.shape[0] < 2:
        raise ValueError(
            f"sampler_steps: `times` must be 1-D with at least 2 entries, got shape "
            f"{times.shape}"
        )
    if ab.shape != times.shape:
        raise ValueError(
            f"sampler_steps: `alpha_bar` must have the shape of `times` "
            f"{times.shape}, got {ab.shape}"
        )
    if concrete_number(jnp.sum(ab)) is not None:  # known at trace time
        values = np.asarray(ab)
        if not np.all((values > 0) & (values < 1)):
            raise ValueError(
                "sampler_steps: every `alpha_bar` must be in (0, 1) (ᾱ = 1 has no "
                f"noise to remove, ᾱ = 0 no signal), got {values.min()} .. "
                f"{values.max()}"
            )
    n = times.shape[0] - 1
    return SamplerSteps(
        t=times[:-1],
        t_next=times[1:],
        alpha_bar=ab[:-1],
        alpha_bar_next=ab[1:],
        alpha_bar_prev=jnp.concatenate([ab[:1], ab[:-2]]),
        k=jnp.arange(n),
    )


def _scales(ab):
    return jnp.sqrt(ab), jnp.sqrt(1 - ab)


def ddim_transfer(x, e, s: SamplerSteps):
    """The DDIM transfer from t_k to t_{k+1} given a noise estimate e:
    α_{k+1} (x - σ_k e) / α_k + σ_{k+1} e (`s`: one row of `SamplerSteps`). For
    samplers whose model keeps a state of its own (a warm-started fixed-point
    layer, say), written as a scan body around it."""
    a, sig = _scales(s.alpha_bar)
    a_next, sig_next = _scales(s.alpha_bar_next)
    return a_next * (x - sig * e) / a + sig_next * e


def _history_increments(init):
    def increments(x):
        sample, history = init(x)
        return jnp.ones_like(sample), jnp.zeros_like(history)

    return increments


def ddim(eps: Callable) -> Sampler:
    """Deterministic DDIM: x_{k+1} = α_{k+1} x̂_0 + σ_{k+1} ε̂(x_k, t_k).

    Args:
      eps: the noise prediction `eps(x, t, alpha_bar) -> array like x` (a model
        conditioned on the time t, or on ᾱ(t); take the one you need).
    """

    def step(x, s):
        return ddim_transfer(x, eps(x, s.t, s.alpha_bar), s), None

    return Sampler(lambda x: x, step, lambda x: x, jnp.ones_like)


# Adams-Bashforth weights of orders 1..4 on (ε̂_k, ε̂_{k-1}, ε̂_{k-2}, ε̂_{k-3})
_ADAMS_BASHFORTH = np.array(
    [
        [1.0, 0.0, 0.0, 0.0],
        [3 / 2, -1 / 2, 0.0, 0.0],
        [23 / 12, -16 / 12, 5 / 12, 0.0],
        [55 / 24, -59 / 24, 37 / 24, -9 / 24],
    ]
)


def plms(eps: Callable) -> Sampler:
    """PNDM's pseudo linear multistep sampler, with Adams-Bashforth warm-up.

        ε'_k = Σ_j w_j ε̂_{k-j},
        x_{k+1} = α_{k+1} (x_k - σ_k ε'_k) / α_k + σ_{k+1} ε'_k,

    w the Adams-Bashforth weights of order min(k + 1, 4). The carry is
    (x, (ε̂_{k-1}, ε̂_{k-2}, ε̂_{k-3})); one model call a step. The first-order
    first step bounds the global order by 2 (the tests measure 2).

    Args:
      eps: the noise prediction `eps(x, t, alpha_bar)`, as for `ddim`.
    """

    def init(x):
        return x, jnp.zeros((3,) + jnp.shape(x), jnp.result_type(x))

    def step(carry, s):
        x, past = carry
        e = eps(x, s.t, s.alpha_bar)
        history = jnp.concatenate([e[None], past])
        w = jnp.asarray(_ADAMS_BASHFORTH, history.dtype)[jnp.minimum(s.k, 3)]
        combined = jnp.tensordot(w, history, axes=1)
        return (ddim_transfer(x, combined, s), history[:3]), None

    return Sampler(init, step, lambda c: c[0], _history_increments(init))


def dpm_solver_pp(eps: Callable) -> Sampler:
    """DPM-Solver++(2M): the multistep second-order solver on data predictions.

    With λ = log(α/σ), h_k = λ_{k+1} - λ_k and D_k the data prediction x̂_0(x_k, t_k),

        x_{k+1} = (σ_{k+1} / σ_k) x_k - α_{k+1} (e^{-h_k} - 1) D'_k,
        D'_k = (1 + 1/(2 r_k)) D_k - D_{k-1} / (2 r_k),    r_k = h_{k-1} / h_k,

    and D'_0 = D_0 (the first step is DDIM). The carry is (x, D_{k-1}).

    Args:
      eps: the noise prediction `eps(x, t, alpha_bar)`, as for `ddim`.
    """

    def init(x):
        return x, jnp.zeros_like(x)

    def log_snr(ab):
        a, sig = _scales(ab)
        return jnp.log(a) - jnp.log(sig)

    def step(carry, s):
        x, d_prev = carry
        a, sig = _scales(s.alpha_bar)
        a_next, sig_next = _scales(s.alpha_bar_next)
        d = (x - sig * eps(x, s.t, s.alpha_bar)) / a
        lam = log_snr(s.alpha_bar)
        h = log_snr(s.alpha_bar_next) - lam
        h_prev = lam - log_snr(s.alpha_bar_prev)
        first = s.k == 0
        half_inv_r = jnp.where(first, 0.0, 0.5 * h / jnp.where(first, 1.0, h_prev))
        combined = (1 + half_inv_r) * d - half_inv_r * d_prev
        x_next = (sig_next / sig) * x - a_next * jnp.expm1(-h) * combined
        return (x_next, d), None

    return Sampler(init, step, lambda c: c[0], _history_increments(init))
