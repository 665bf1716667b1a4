"""Inverting the DDIM chain of `diffusion_train`'s model: find the noise x_T that
sampling maps to a given digit, one step at a time, as a root problem.

Sampling takes x_{k+1} = φ_k(x_k) = α_{k+1} (x_k - σ_k ε̂(x_k)) / α_k + σ_{k+1} ε̂(x_k).
Inverting step k means solving φ_k(x) = x_{k+1} for x, from the image x_N back to
the noise x_0 = x_T. Methods, per step (warm-started at x_{k+1}):

* `ddim`: the usual DDIM inversion, ε̂ taken at x_{k+1} instead of at the
  unknown x: one model call a step, no solve (not exact);
* `fixed_point` / `anderson`: the fixed point of x = (α_k / α_{k+1}) (x_{k+1} -
  σ_{k+1} ε̂(x)) + σ_k ε̂(x) (fixed-point inversion), by `iterjax.fixed_point`
  with Picard or Anderson, to `atol`;
* `newton`: the root of φ_k(x) - x_{k+1} by `iterjax.root` with Newton's method
  (matrix-free GMRES on Jacobian-vector products; Newton-Raphson inversion),
  to `atol`.

Reported per method: the reconstruction error (RMS, pixels in [-1, 1]) of
sampling again from the inverted noise, the model calls per image (evaluations
and Jacobian-vector products, counted by `iterjax.diagnostics.EvalCounter`), and
whether every step's solve converged.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import iterjax as ij
from iterjax.experiments import picard_diffusion_trained
from iterjax.experiments.common import digits_diffusion as dd
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table
from iterjax.sequence import samplers

Method = Literal["ddim", "fixed_point", "anderson", "newton"]


@dataclasses.dataclass(frozen=True)
class Config:
    checkpoint: str = "latest"  # as picard_diffusion_trained's
    model: dd.ModelConfig = dd.ModelConfig()
    train: dd.TrainConfig = dd.TrainConfig()
    digits: Count = 16  # held-out digits inverted together
    steps: tuple[Count, ...] = (50, 200)  # DDIM steps N
    methods: tuple[Method, ...] = ("ddim", "fixed_point", "anderson", "newton")
    atol: Positive = 1e-8
    max_steps: Count = 30  # per inversion step
    seed: int = 0
    x64: bool = True


def _scales(s):
    a, a_next = jnp.sqrt(s.alpha_bar), jnp.sqrt(s.alpha_bar_next)
    return a, jnp.sqrt(1 - s.alpha_bar), a_next, jnp.sqrt(1 - s.alpha_bar_next)


def invert(eps, x0, steps, method, atol, max_steps):
    """x_T for each image in x0 [n, 64]; returns (x_T, counter, all converged)."""
    sampler = samplers.ddim(eps)

    def backward(x_next, s):  # x = (a / a') (x' - σ' ε̂(x)) + σ ε̂(x)
        a, sig, a_next, sig_next = _scales(s)
        return lambda x, e: a / a_next * (x_next - sig_next * e) + sig * e

    def fixed_point_map(x, args):
        x_next, s = args
        return backward(x_next, s)(x, eps(x, s.t, s.alpha_bar))

    def residual(x, args):  # φ_k(x) - x_{k+1}
        x_next, s = args
        return sampler.step(x, s)[0] - x_next

    counted = ij.diagnostics.EvalCounter(
        residual if method == "newton" else fixed_point_map
    )

    def one(x_next, s):
        if method == "ddim":
            return counted.fn(x_next, (x_next, s)), jnp.bool_(True)
        kw = dict(atol=atol, max_steps=max_steps)
        if method == "newton":
            sol = ij.root(counted.fn, x_next, (x_next, s), solver=ij.Newton(), **kw)
        else:
            solver = ij.Picard() if method == "fixed_point" else ij.Anderson()
            sol = ij.fixed_point(counted.fn, x_next, (x_next, s), solver=solver, **kw)
        return sol.value, sol.converged

    def body(x, s):
        x_prev, ok = jax.vmap(one, in_axes=(0, None))(x, s)
        return x_prev, jnp.all(ok)

    reverse = jax.tree.map(lambda a: a[::-1], steps)
    xT, ok = jax.jit(lambda x: jax.lax.scan(body, x, reverse))(x0)
    return xT, counted.read(), bool(jnp.all(ok))


def run(cfg: Config, workdir) -> dict:
    denoiser, _, source = picard_diffusion_trained.load_models(cfg, workdir)
    eps = dd.eps_fn(denoiser)
    _, _, test, _ = dd.images()
    x0 = jnp.asarray(test[: cfg.digits], jnp.float64)
    s = samplers.ddim(eps)
    rows, shown = [], {}
    with workdir.progress(len(cfg.steps) * len(cfg.methods), "inverting") as advance:
        for N in cfg.steps:
            steps = dd.sampling_steps(N)
            sample = jax.jit(lambda z, steps=steps: jax.lax.scan(s.step, z, steps)[0])
            for method in cfg.methods:
                xT, counts, ok = invert(eps, x0, steps, method, cfg.atol, cfg.max_steps)
                again = sample(xT)
                row = dict(
                    steps=N,
                    method=method,
                    reconstruction_rms=float(jnp.sqrt(jnp.mean((again - x0) ** 2))),
                    calls_per_image=(counts["f"] + counts["jvp"]) / cfg.digits,
                    evaluations_per_image=counts["f"] / cfg.digits,
                    jvps_per_image=counts["jvp"] / cfg.digits,
                    converged=ok,
                    noise_std=float(jnp.std(xT)),
                )
                workdir.log(**row)
                rows.append(row)
                shown[(N, method)] = np.asarray(again)
                advance()
    _plot(cfg, x0, shown, workdir)
    return dict(model=source, rows=rows, table=_table(rows))


def _plot(cfg, x0, shown, workdir):
    N = max(cfg.steps)
    images = [np.asarray(x0[:8])] + [shown[(N, m)][:8] for m in cfg.methods]
    fig, ax = plt.subplots(figsize=(8, 1.2 * len(images)))
    dd.show(
        ax,
        np.concatenate(images),
        f"N = {N}: digits, then resampled from the noise of " + ", ".join(cfg.methods),
    )
    workdir.savefig(fig, "diffusion_inversion.png")


def _table(rows):
    headers = ["N", "method", "reconstruction RMS", "model calls per image"]
    headers += ["(evaluations + JVPs)", "converged", "std of x_T"]
    cells = lambda r: [
        r["steps"],
        r["method"],
        f"{r['reconstruction_rms']:.1e}",
        f"{r['calls_per_image']:.0f}",
        f"{r['evaluations_per_image']:.0f} + {r['jvps_per_image']:.0f}",
        "yes" if r["converged"] else "NO",
        f"{r['noise_std']:.2f}",
    ]
    return markdown_table(headers, map(cells, rows))
