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
  to `atol`;
* `rnri`: regularised Newton-Raphson inversion (Samuel et al. 2024). Newton-
  Raphson on the scalar g(x) = ‖r(x)‖₁/n + λ ‖x - μ‖²/(2 n v), r(x) = φ_k(x) -
  x_{k+1}, whose second term is the negative log-likelihood of x under the
  forward noising step from x_{k+1} (mean μ = (α_k/α_{k+1}) x_{k+1}, variance v
  = 1 - α_k²/α_{k+1}²). A scalar's Newton step is the least-norm root of its
  linearisation, x ← x - g ∇g/‖∇g‖² (one evaluation and one vector-Jacobian
  product), until ‖r‖_∞ ≤ `atol` or `max_steps`. λ = `prior_weight` (0: no
  prior). The prior keeps x_T near Gaussian at large steps; with λ > 0 the root
  of r is no longer the minimum of g, so the residual stalls above 0.

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
from iterjax.lab.spec import Count, NonNegative, Positive
from iterjax.lab.tables import markdown_table
from iterjax.sequence import samplers

Method = Literal["ddim", "fixed_point", "anderson", "newton", "rnri"]


@dataclasses.dataclass(frozen=True)
class Config:
    checkpoint: str = "latest"  # as picard_diffusion_trained's
    model: dd.ModelConfig = dd.ModelConfig()
    train: dd.TrainConfig = dd.TrainConfig()
    digits: Count = 16  # held-out digits inverted together
    steps: tuple[Count, ...] = (50, 200)  # DDIM steps N
    methods: tuple[Method, ...] = ("ddim", "fixed_point", "anderson", "newton", "rnri")
    atol: Positive = 1e-8
    max_steps: Count = 30  # per inversion step
    prior_weight: NonNegative = 0.1  # RNRI's λ
    seed: int = 0
    x64: bool = True


def _scales(s):
    a, a_next = jnp.sqrt(s.alpha_bar), jnp.sqrt(s.alpha_bar_next)
    return a, jnp.sqrt(1 - s.alpha_bar), a_next, jnp.sqrt(1 - s.alpha_bar_next)


def _rnri(residual, x, args, prior, lam, atol, max_steps):
    """Newton-Raphson on the scalar g = ‖r‖₁/n + λ ‖x - μ‖²/(2 n v): returns
    (x, converged, iterations); each iteration is one evaluation and one VJP."""
    mu, v = prior

    def g(x):
        r = residual(x, args)
        return jnp.mean(jnp.abs(r)) + lam * jnp.mean((x - mu) ** 2) / (2 * v), r

    def body(carry):
        x, _, k = carry
        (value, _), grad = jax.value_and_grad(g, has_aux=True)(x)
        x = x - value * grad / jnp.sum(grad**2)
        return x, jnp.max(jnp.abs(residual(x, args))), k + 1

    cond = lambda c: (c[1] > atol) & (c[2] < max_steps)
    r0 = jnp.max(jnp.abs(residual(x, args)))
    x, r, k = jax.lax.while_loop(cond, body, (x, r0, jnp.int32(0)))
    return x, r <= atol, k


def invert(eps, x0, steps, method, atol, max_steps, prior_weight=0.0):
    """x_T for each image in x0 [n, 64]; returns (x_T, counts, all converged)."""
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
            return counted.fn(x_next, (x_next, s)), jnp.bool_(True), 0
        if method == "rnri":
            a, _, a_next, _ = _scales(s)
            prior = (a / a_next * x_next, 1 - (a / a_next) ** 2)
            return _rnri(
                residual, x_next, (x_next, s), prior, prior_weight, atol, max_steps
            )
        kw = dict(atol=atol, max_steps=max_steps)
        if method == "newton":
            sol = ij.root(counted.fn, x_next, (x_next, s), solver=ij.Newton(), **kw)
        else:
            solver = ij.Picard() if method == "fixed_point" else ij.Anderson()
            sol = ij.fixed_point(counted.fn, x_next, (x_next, s), solver=solver, **kw)
        return sol.value, sol.converged, 0

    def body(x, s):
        x_prev, ok, iterations = jax.vmap(one, in_axes=(0, None))(x, s)
        return x_prev, (jnp.all(ok), jnp.sum(iterations))

    reverse = jax.tree.map(lambda a: a[::-1], steps)
    xT, (ok, iterations) = jax.jit(lambda x: jax.lax.scan(body, x, reverse))(x0)
    if method == "rnri":  # counted here: a VJP does not go through EvalCounter
        n = int(jnp.sum(iterations))
        counts = {"f": n + len(x0) * len(reverse.t), "jvp": n}
    else:
        counts = counted.read()
    return xT, counts, bool(jnp.all(ok))


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
                xT, counts, ok = invert(
                    eps, x0, steps, method, cfg.atol, cfg.max_steps, cfg.prior_weight
                )
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
    headers += ["(evaluations + JVPs or VJPs)", "converged", "std of x_T"]
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
