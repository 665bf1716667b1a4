"""Parallel (Picard) DDIM sampling of a 2-D diffusion model, and the whole chain as
one differentiable fixed point.

The model is `experiments.diffusion`: two moons blurred by a bandwidth, with the
exact denoiser, so the N-step DDIM chain from t = 1 to 0 is a recurrence with a
sequential reference. For each N and method (`picard` over the whole chain, or
with a ParaDiGMS window W): sweeps to converge (one sweep = one parallel
evaluation of the denoiser over the window), denoiser evaluations, parallel depth
and the error against sequential DDIM. The per-step tolerance is error_target / N,
so the sample error stays below error_target. Beside each, ParaDiGMS's own loop
(`diffusion.paradigms`) at the same window and tolerance: its passes, model
evaluations and error. Evaluations count the steps not yet accepted that a
sweep evaluates (ParaDiGMS's window shrinks at the end of the chain); a JAX
sweep computes its whole window, the number in brackets.

Then the DEQ view (Deep Equilibrium Diffusion Restoration): the samples are a
differentiable function of the initial noise through `iterjax.scan`, whose
gradient is one more parallel (Picard) solve of the adjoint chain. It is checked
against the gradient through `lax.scan` (at `grad_stop`'s tolerance, and at the working
tolerance, where it is as accurate as the forward solution it linearises), and
used to steer the initial noise so that the samples match observed first
coordinates (a 2-D "restoration" task).
"""

import dataclasses
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import iterjax as ij
from iterjax.experiments.common import cells, diffusion
from iterjax.lab.config import Spec
from iterjax.lab.registry import build
from iterjax.lab.spec import Count, Positive, Stop
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    num_points: Count = 256  # points of the two-moons set
    bandwidth: Positive = 0.05  # Gaussian blur of each point
    samples: Count = 128  # samples drawn together (one carry [samples, 2])
    steps: tuple[Count, ...] = (100, 250, 500, 1000)  # DDIM steps N
    methods: tuple[Annotated[Spec, "sequence_method"], ...] = (
        Spec("picard"),
        Spec("picard", (("window", 128),)),
        Spec("picard", (("window", 32),)),
    )
    error_target: Positive = 1e-3  # per-step atol = error_target / N
    # `scan`'s acceptance rule: "tested" (residual and update of every position)
    # or "paradigms" (ParaDiGMS's loop: update only, one more position a sweep)
    acceptance: Literal["tested", "paradigms"] = "tested"
    curve_steps: Count = 1000  # N of the error-vs-sweeps curves
    curve_sweeps: Count = 60
    guide_steps: Count = 100  # N of the chain whose initial noise is optimised
    guide_method: Annotated[Spec, "sequence_method"] = Spec("picard", (("window", 32),))
    guide_iters: Count = 50  # Adam steps on the initial noise
    guide_lr: Positive = 0.05
    grad_stop: Stop = Stop(atol=1e-10)  # the gradient check against lax.scan
    repeats: Count = 1
    seed: int = 0
    x64: bool = True


def sampler(cfg, N):
    """(DDIM step, schedule xs, initial noise) for an N-step chain."""
    points = jnp.asarray(diffusion.moons(cfg.num_points, seed=cfg.seed))
    f = diffusion.ddim_step(points, cfg.bandwidth)
    z = jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.samples, 2))
    return f, diffusion.schedule(N), z, points


def measure(cfg, N, s):
    method = build("sequence_method", s)
    f, xs, z, _ = sampler(cfg, N)
    atol = cfg.error_target / N
    run = jax.jit(
        lambda z: ij.scan(
            f,
            z,
            xs,
            method=method,
            atol=atol,
            acceptance=cfg.acceptance,
            return_stats=True,
        )
    )
    ref = jax.jit(lambda z: jax.lax.scan(f, z, xs)[0])
    x, _, stats = run(z)
    times = ij.diagnostics.time_calls(
        {"picard": (run, (z,)), "lax": (ref, (z,))}, cfg.repeats
    )
    sweeps = int(stats.num_sweeps)
    window = min(method.window or N, N)
    # ParaDiGMS's own loop, same chain, window and tolerance
    xp, passes, evaluations = diffusion.paradigms(f, z, xs, window, atol)
    x_ref = ref(z)
    return dict(
        steps=N,
        method=s.label,
        acceptance=cfg.acceptance,
        sweeps=sweeps,
        converged=bool(stats.converged),
        evaluations=int(stats.evaluations),
        computed=sweeps * window,
        depth=sweeps * cells.parallel_depth(method, N),
        error=cells.max_error(x, x_ref),
        wall_ratio=times["picard"] / times["lax"],
        paradigms_passes=passes,
        paradigms_evaluations=evaluations,
        paradigms_error=float(np.max(np.abs(xp[-1] - np.asarray(x_ref)))),
    ), np.asarray(x)


def guide(cfg):
    """Gradient check, then Adam on the initial noise through the Picard chain."""
    f, xs, z, points = sampler(cfg, cfg.guide_steps)
    atol = cfg.error_target / cfg.guide_steps
    idx = jax.random.choice(jax.random.key(cfg.seed + 2), len(points), (cfg.samples,))
    observed = points[idx, 0]  # the first coordinate of a data point per sample

    def loss(z, scan):
        x = scan(z)
        return jnp.mean((x[:, 0] - observed) ** 2)

    method = build("sequence_method", cfg.guide_method)

    def chain(**stop):
        return lambda z: ij.scan(f, z, xs, method=method, **stop)[0]

    picard = jax.jit(chain(atol=atol))  # compiled once for its three calls below
    g_seq = jax.grad(lambda z: loss(z, lambda z: jax.lax.scan(f, z, xs)[0]))(z)
    rel = {}  # the gradient is taken at the forward solution: its error follows it
    stops = {"working_atol": {"atol": atol}, "grad": cfg.grad_stop.kwargs("max_sweeps")}
    for name, stop in stops.items():
        g = jax.jit(jax.grad(lambda z, stop=stop: loss(z, chain(**stop))))(z)
        rel[name] = float(jnp.linalg.norm(g - g_seq) / jnp.linalg.norm(g_seq))

    opt = optax.adam(cfg.guide_lr)

    @jax.jit
    def step(z, state):
        value, g = jax.value_and_grad(lambda z: loss(z, picard))(z)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
            updates, state = opt.update(g, state, z)
            return optax.apply_updates(z, updates), state, value

    state, losses, z0 = opt.init(z), [], z
    for _ in range(cfg.guide_iters):
        z, state, value = step(z, state)
        losses.append(float(value))
    before, after = np.asarray(picard(z0)), np.asarray(picard(z))
    return dict(
        grad_rel_error=rel["grad"],
        grad_rel_error_working_atol=rel["working_atol"],
        loss_first=losses[0],
        loss_last=float(loss(z, picard)),
        losses=losses,
        off_manifold_before=_off_manifold(before, points),
        off_manifold_after=_off_manifold(after, points),
    ), (before, after, np.asarray(observed))


def _off_manifold(x, points):
    """Mean distance from each sample to its nearest data point."""
    d = np.linalg.norm(x[:, None] - np.asarray(points)[None], axis=-1)
    return float(d.min(1).mean())


def run(cfg: Config, workdir) -> dict:
    rows, samples, curves = [], {}, {}
    total = (len(cfg.steps) + 1) * len(cfg.methods) + 1
    with workdir.progress(total, "sampling") as advance:
        for N in cfg.steps:
            for s in cfg.methods:
                row, x = measure(cfg, N, s)
                workdir.log(**row)
                rows.append(row)
                samples[(N, s.label)] = x
                advance()
        f, xs, z, _ = sampler(cfg, cfg.curve_steps)
        for s in cfg.methods:
            method = build("sequence_method", s)
            err = cells.sweep_errors(
                f, z, xs, method, cfg.error_target / cfg.curve_steps, cfg.curve_sweeps
            )
            curves[s.label] = err
            workdir.log(kind="error_vs_sweeps", method=s.label, errors=err)
            advance()
        guided, guided_samples = guide(cfg)
        workdir.log(kind="guidance", **guided)
        advance()
    _plot(cfg, rows, curves, samples, guided, guided_samples, workdir)
    return {"rows": rows, "guidance": guided, "table": _table(rows)}


def _plot(cfg, rows, curves, samples, guided, guided_samples, workdir):
    fig, ax = plt.subplots(2, 2, figsize=(11, 10))
    for m in dict.fromkeys(r["method"] for r in rows):
        pts = np.asarray([(r["steps"], r["sweeps"]) for r in rows if r["method"] == m])
        ax[0, 0].loglog(pts[:, 0], pts[:, 1], "o-", label=m)
    N = np.asarray(cfg.steps)
    ax[0, 0].loglog(N, N, "k--", lw=0.7, label="N (sequential)")
    ax[0, 0].loglog(N, N / 4, "k:", lw=0.7, label="N / 4")
    ax[0, 0].set(
        title=f"sweeps to error {cfg.error_target:g}",
        xlabel="DDIM steps N",
        ylabel="sweeps (parallel passes over N)",
    )
    for m, err in curves.items():
        ax[0, 1].semilogy(np.arange(1, len(err) + 1), np.maximum(err, 1e-17), label=m)
    ax[0, 1].axhline(cfg.error_target, color="k", lw=0.5, ls="--")
    ax[0, 1].set(
        title=f"N={cfg.curve_steps}: error vs sequential DDIM",
        xlabel="sweep",
        ylabel="max |x - x(lax.scan)|",
    )
    points = diffusion.moons(cfg.num_points, seed=cfg.seed)
    N_max, first = max(cfg.steps), cfg.methods[0].label
    ax[1, 0].scatter(*points.T, s=4, c="0.7", label="data points")
    ax[1, 0].scatter(*samples[(N_max, first)].T, s=8, label=f"Picard, N={N_max}")
    ax[1, 0].set(title="samples", aspect="equal", xlabel="x₁", ylabel="x₂")
    before, after, observed = guided_samples
    ax[1, 1].scatter(*points.T, s=4, c="0.7")
    ax[1, 1].scatter(*before.T, s=8, alpha=0.5, label="from the initial noise")
    ax[1, 1].scatter(*after.T, s=8, label="after optimising the noise")
    ax[1, 1].scatter(observed, np.full_like(observed, -2.2), marker="|", c="k")
    ax[1, 1].set(
        title=f"guidance to observed x-coordinates (|), loss "
        f"{guided['loss_first']:.3f} -> {guided['loss_last']:.4f}",
        aspect="equal",
        xlabel="x₁",
        ylabel="x₂",
    )
    for a in ax.flat:
        a.legend(fontsize=7)
    workdir.savefig(fig, "picard_diffusion.png")


def _table(rows):
    headers = ["N", "method", "sweeps", "N / sweeps", "evaluations", "error"]
    headers += ["wall / lax.scan", "ParaDiGMS passes", "evaluations", "error"]
    cells = lambda r: [
        r["steps"],
        r["method"],
        r["sweeps"],
        f"{r['steps'] / r['sweeps']:.1f}",
        f"{r['evaluations']} ({r['computed']})",
        f"{r['error']:.1e}",
        f"{r['wall_ratio']:.1f}",
        r["paradigms_passes"],
        r["paradigms_evaluations"],
        f"{r['paradigms_error']:.1e}",
    ]
    return markdown_table(headers, map(cells, rows))
