"""Learning-rate schedules that optax lacks, as optax schedules (`step -> rate`).

What optax has (linear, cosine, warm-up + cosine, SGDR, exponential, schedule-free,
Polyak step sizes) is used from optax, by name from configs
(`iterjax.lab.optim`); this module adds the refined schedule of Defazio et al.
(2023), built from the gradient norms of an earlier run.
"""

import jax.numpy as jnp
import numpy as np
import scipy.ndimage  # a dependency of jax

from .._checks import check_range


def refined_weights(grad_norms, smoothing: float = 0.0) -> np.ndarray:
    r"""The refined step-size weights for SGD, from a run's gradient norms.

    Defazio, Cutkosky, Mehta and Mishchenko (2023), "When, Why and How Much?
    Adaptive Learning Rate Scheduling by Refinement": for SGD's last iterate, the
    weights that minimise the paper's bound, given the norms ‖g_1‖, ..., ‖g_T‖ of
    the gradients a run will see, are

    $$ w_t = \|g_t\|^{-2} \sum_{p=t+1}^{T} \|g_p\|^{-2}, \qquad t = 1..T, $$

    normalised here to a peak of 1. With constant norms this is linear decay,
    w_t ∝ T - t, the schedule the paper's worst-case analysis gives; large
    gradient norms late in a run anneal it faster, large ones early give warm-up.
    The last weight is 0.

    Norms observed in one run are noisy, so the paper first smooths them with a
    median filter of width `smoothing * T` (made odd; the sequence reflected
    at both ends, so that the first and last norms keep their level).

    Args:
      grad_norms: (T,) positive gradient norms of a previous run, one a step.
      smoothing: the median filter's width as a fraction of T, in [0, 1]
        (0: none).

    Returns:
      (T,) numpy float64 weights in [0, 1], the largest 1.

    Example:
      >>> import numpy as np, iterjax
      >>> iterjax.tuning.refined_weights(np.ones(5)).tolist()  # constant: linear decay
      [1.0, 0.75, 0.5, 0.25, 0.0]
    """
    g = np.asarray(grad_norms, dtype=np.float64)
    if g.ndim != 1 or g.size < 2:
        raise ValueError(
            f"refined_weights: `grad_norms` must be a 1-d sequence of at least two "
            f"norms, got shape {g.shape}"
        )
    if not np.all(np.isfinite(g)) or np.any(g <= 0):
        raise ValueError(
            "refined_weights: `grad_norms` must be finite and positive "
            f"(min {g.min()}, non-finite {int(np.sum(~np.isfinite(g)))})"
        )
    check_range("refined_weights", "smoothing", smoothing, lo=0.0, hi=1.0)
    g = _median_smooth(g, smoothing)
    inv = g**-2.0
    tail = np.cumsum(inv[::-1])[::-1]  # tail[t] = Σ_{p ≥ t} ‖g_p‖⁻²
    w = inv * np.append(tail[1:], 0.0)
    return w / w.max()


def _median_smooth(g, smoothing):
    width = 2 * (int(smoothing * g.size) // 2) + 1  # odd
    if width == 1:
        return g
    return scipy.ndimage.median_filter(g, size=width, mode="mirror")


def refined_schedule(learning_rate: float, grad_norms, smoothing: float = 0.0):
    """An optax schedule: `learning_rate` times the refined weights (see
    `refined_weights`), step t of T taking w_t; steps past T take 0.

    Example:
      >>> import numpy as np, optax
      >>> sched = refined_schedule(0.1, np.ones(5))  # constant norms: linear
      >>> [round(float(sched(t)), 3) for t in range(5)]
      [0.1, 0.075, 0.05, 0.025, 0.0]
      >>> opt = optax.sgd(sched)
    """
    check_range("refined_schedule", "learning_rate", learning_rate, lo=0.0)
    table = jnp.asarray(refined_weights(grad_norms, smoothing) * learning_rate)

    def schedule(count):  # an int step, or a float one (rounded down)
        last = table.shape[0] - 1
        value = table[jnp.clip(count, 0, last).astype(jnp.int32)]
        return jnp.where(count <= last, value, 0.0)

    return schedule
