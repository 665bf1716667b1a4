"""Inpainting a digit through the whole sampling chain, solved as one fixed point
(Deep Equilibrium diffusion restoration, on `diffusion_train`'s model).

The N-step DDIM chain from noise z to a sample x(z) is solved in parallel by
Picard sweeps (`iterjax.scan`); its gradient w.r.t. z is one more parallel solve
of the adjoint chain, not backpropagation through N sequential steps. For
`digits` held-out digits y with the pixels of `hidden` unseen (the lower half by
default), Adam on z minimises

    L(z) = mean over observed pixels of (x(z) - y)²  +  prior · mean(z²) / 2,

and the hidden pixels of x(z) are the restoration. Reported: the gradient of L
against central finite differences and against backpropagation through
`lax.scan` (float64, at `grad_stop`), sweeps of the forward and adjoint solves,
and the RMS error on the observed and on the hidden pixels, before and after,
beside a baseline: the training digit nearest on the observed pixels.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import iterjax as ij
from iterjax.experiments import picard_diffusion_trained
from iterjax.experiments.common import digits_diffusion as dd
from iterjax.lab.spec import Count, NonNegative, Positive, Stop
from iterjax.sequence import samplers


@dataclasses.dataclass(frozen=True)
class Config:
    checkpoint: str = "latest"  # as picard_diffusion_trained's
    model: dd.ModelConfig = dd.ModelConfig()
    train: dd.TrainConfig = dd.TrainConfig()
    digits: Count = 16  # held-out digits restored together
    hidden: Literal["lower_half", "right_half", "checkerboard"] = "lower_half"
    steps: Count = 50  # DDIM steps of the chain
    atol: Positive = 1e-6  # Picard's per-step tolerance in the optimisation
    grad_stop: Stop = Stop(atol=1e-12)  # Picard's tolerance in the gradient check
    fd_step: Positive = 1e-5
    prior: NonNegative = 0.01
    iters: Count = 100  # Adam steps on z
    lr: Positive = 0.05
    seed: int = 0
    x64: bool = True


def observed_mask(kind):
    rows, cols = np.mgrid[:8, :8]
    hidden = {
        "lower_half": rows >= 4,
        "right_half": cols >= 4,
        "checkerboard": (rows + cols) % 2 == 1,
    }[kind]
    return jnp.asarray(~hidden.reshape(64), jnp.float64)


def chain(eps, num_steps):
    """z -> (x(z), stats) by Picard over the DDIM chain, and z -> x(z) by lax.scan."""
    s = samplers.ddim(eps)
    steps = dd.sampling_steps(num_steps)

    def picard(z, atol, rtol=0.0, **budget):
        x, _, stats = ij.scan(
            s.step,
            z,
            steps,
            method=ij.sequence.Picard(),
            atol=atol,
            rtol=rtol,
            return_stats=True,
            **budget,
        )
        return x, stats.num_sweeps

    return picard, lambda z: (jax.lax.scan(s.step, z, steps)[0], None)


def run(cfg: Config, workdir) -> dict:
    denoiser, _, source = picard_diffusion_trained.load_models(cfg, workdir)
    picard, sequential = chain(dd.eps_fn(denoiser), cfg.steps)
    train_images, _, test, _ = dd.images()
    y = jnp.asarray(test[: cfg.digits], jnp.float64)
    mask = observed_mask(cfg.hidden)
    # baseline: the training digit closest on the observed pixels, pasted
    d = ((np.asarray(y)[:, None] - train_images[None]) ** 2 * np.asarray(mask)).sum(-1)
    nearest = jnp.asarray(train_images[d.argmin(1)], jnp.float64)

    def loss(z, solve):
        """(L(z), what `solve` reports besides x(z))."""
        x, aux = solve(z)
        fit = jnp.sum(mask[None] * (x - y) ** 2) / (jnp.sum(mask) * cfg.digits)
        return fit + cfg.prior * jnp.mean(z**2) / 2, aux

    z0 = jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.digits, 64))
    check = gradient_check(cfg, loss, picard, sequential, z0)
    workdir.log(kind="gradient_check", **check)

    opt = optax.adam(cfg.lr)

    @jax.jit
    def step(z, state):
        solve = lambda z: picard(z, cfg.atol)
        (value, sweeps), g = jax.value_and_grad(loss, has_aux=True)(z, solve)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
            updates, state = opt.update(g, state, z)
            return optax.apply_updates(z, updates), state, value, sweeps

    z, state, history = z0, opt.init(z0), []
    with workdir.progress(cfg.iters, "restoring") as advance:
        for k in range(cfg.iters):
            z, state, value, sweeps = step(z, state)
            history.append(float(value))
            workdir.log(step=k + 1, loss=float(value), sweeps=int(sweeps))
            advance()
    before, after = sequential(z0)[0], picard(z, cfg.atol)[0]
    errors = {
        f"{part}_rms_{when}": rms(x, y, m)
        for when, x in (("before", before), ("after", after))
        for part, m in (("observed", mask), ("hidden", 1 - mask))
    }
    errors["hidden_rms_nearest_neighbour"] = rms(nearest, y, 1 - mask)
    _plot(y, mask, before, after, history, workdir)
    return dict(model=source, gradient_check=check, losses=history, **errors)


def rms(x, y, mask):
    return float(
        jnp.sqrt(jnp.sum(mask[None] * (x - y) ** 2) / (jnp.sum(mask) * len(x)))
    )


def gradient_check(cfg, loss, picard, sequential, z):
    """∇L through the Picard chain (at grad_stop) against backpropagation through
    lax.scan and against central differences along a random direction."""
    solve = lambda z: picard(z, **cfg.grad_stop.kwargs("max_sweeps"))
    g, sweeps = jax.jit(jax.grad(loss, has_aux=True), static_argnums=1)(z, solve)
    g_seq, _ = jax.grad(loss, has_aux=True)(z, sequential)
    v = jax.random.normal(jax.random.key(cfg.seed + 2), z.shape)
    v = v / jnp.linalg.norm(v)
    L = jax.jit(lambda z: loss(z, sequential)[0])
    h = cfg.fd_step
    fd = (L(z + h * v) - L(z - h * v)) / (2 * h)
    return dict(
        rel_to_lax_scan=float(jnp.linalg.norm(g - g_seq) / jnp.linalg.norm(g_seq)),
        directional=float(jnp.vdot(g, v)),
        finite_difference=float(fd),
        rel_to_fd=float(abs(jnp.vdot(g, v) - fd) / abs(fd)),
        forward_sweeps=int(sweeps),
    )


def _plot(y, mask, before, after, losses, workdir):
    n = min(8, len(y))
    fig, ax = plt.subplots(
        1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [1, 2]}
    )
    ax[0].semilogy(losses)
    ax[0].set(title="inpainting loss", xlabel="Adam step on z", ylabel="L(z)")
    shown = np.concatenate(
        [
            np.asarray(y[:n]),
            np.asarray(y[:n]) * np.asarray(mask) - (1 - np.asarray(mask)),
            np.asarray(before[:n]),
            np.asarray(after[:n]),
        ]
    )
    dd.show(ax[1], shown, "rows: digit, observed, sample from z₀, restored")
    workdir.savefig(fig, "diffusion_restoration.png")
