"""Warm-started chains: a DEQ layer applied along a diffusion sampler's timesteps.

As in Fixed Point Diffusion Models, an implicit layer z = tanh(W z + U [x_k, τ_k] + b)
(W scaled to spectral norm `radius`, so it is a contraction) sits inside the
denoiser, and sampling solves one fixed point per DDIM step k, for every sample
at once: a chain of `steps` related problems whose inputs, the samples x_k of the
2-D diffusion model of `picard_diffusion` and the time embedding τ_k, move a little
per step. `iterjax.fixed_point_chain` solves the chain in one `lax.scan`, cold
(every problem from z = 0) or warm (each from the previous solution); and the
real-time iteration (a few warm-started steps per problem, no convergence test)
for its error. Rows: total solver steps, steps per problem, the largest
difference from the cold chain's solutions, and the wall time of the jitted chain.
"""

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import iterjax as ij
from iterjax.experiments.common import diffusion
from iterjax.lab.config import Spec
from iterjax.lab.registry import build
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    steps: Count = 500  # DDIM steps: problems in the chain
    samples: Count = 64
    hidden: Count = 32
    radius: Positive = 0.9
    points: Count = 256
    bandwidth: Positive = 0.1
    solvers: tuple[Annotated[Spec, "solver"], ...] = (Spec("picard"), Spec("anderson"))
    atol: Positive = 1e-4
    max_steps: Count = 500
    rti_steps: tuple[Count, ...] = (1, 2, 4)
    repeats: Count = 3
    seed: int = 0
    x64: bool = True


def problem(cfg):
    """(fn, params, xs, z0): the DEQ cell, its weights, the chain's inputs."""
    points = jnp.asarray(diffusion.moons(cfg.points, seed=cfg.seed))
    sched = diffusion.schedule(cfg.steps)
    x_T = jax.random.normal(jax.random.key(cfg.seed), (cfg.samples, 2))
    step = diffusion.ddim_step(points, cfg.bandwidth)
    _, path = jax.lax.scan(lambda x, s: (step(x, s)[0],) * 2, x_T, sched)
    path = jnp.concatenate([x_T[None], path[:-1]])  # the sample entering step k
    tau = jnp.linspace(1.0, 0.0, cfg.steps)
    k1, k2, k3 = jax.random.split(jax.random.key(cfg.seed + 1), 3)
    w = jax.random.normal(k1, (cfg.hidden, cfg.hidden))
    w = cfg.radius * w / jnp.linalg.norm(w, 2)
    u = jax.random.normal(k2, (3, cfg.hidden))
    b = 0.1 * jax.random.normal(k3, (cfg.hidden,))

    def fn(z, params, x):
        w, u, b = params
        inputs = jnp.concatenate([x[0], jnp.broadcast_to(x[1], (x[0].shape[0], 1))], 1)
        return jnp.tanh(z @ w.T + inputs @ u + b[None])

    z0 = jnp.zeros((cfg.samples, cfg.hidden))
    return fn, (w, u, b), (path, tau[:, None]), z0


def run(cfg: Config, workdir) -> dict:
    fn, params, xs, z0 = problem(cfg)
    rows, per_problem = [], {}

    def chain(solver, warm, max_steps, atol):
        return jax.jit(
            lambda p: ij.fixed_point_chain(
                fn,
                z0,
                xs,
                p,
                solver=solver,
                warm_start=warm,
                atol=atol,
                max_steps=max_steps,
            )
        )

    reference = None
    runs = [(s, warm) for s in cfg.solvers for warm in (False, True)]
    with workdir.progress(len(runs) + len(cfg.rti_steps), "chains") as advance:
        for s, warm in runs:
            solve = chain(build("solver", s), warm, cfg.max_steps, cfg.atol)
            sols = solve(params)
            if reference is None:
                reference = sols.value
            label = f"{s.label}, {'warm' if warm else 'cold'}"
            rows.append(_row(cfg, label, sols, reference, solve, params))
            per_problem[label] = np.asarray(sols.num_steps)
            workdir.log(**rows[-1])
            advance()
        for k in cfg.rti_steps:  # real-time iteration: k Picard steps, warm
            solve = chain(ij.Picard(), True, k, 0.0)
            sols = solve(params)
            rows.append(
                _row(
                    cfg,
                    f"real-time iteration ({k} steps)",
                    sols,
                    reference,
                    solve,
                    params,
                )
            )
            workdir.log(**rows[-1])
            advance()
    _plot(cfg, per_problem, workdir)
    savings = {
        s.label: next(r for r in rows if r["chain"] == f"{s.label}, cold")[
            "total_steps"
        ]
        / next(r for r in rows if r["chain"] == f"{s.label}, warm")["total_steps"]
        for s in cfg.solvers
    }
    table = markdown_table(
        [
            "chain",
            "total steps",
            "steps / problem",
            "converged",
            "max |z - z_cold|",
            "ms",
        ],
        [
            [
                r["chain"],
                r["total_steps"],
                r["steps_per_problem"],
                r["converged"],
                f"{r['max_error']:.1e}",
                r["ms"],
            ]
            for r in rows
        ],
    )
    table += "\n\nwarm-start saving (total steps, cold / warm): " + ", ".join(
        f"{k}: {v:.2f}x" for k, v in savings.items()
    )
    return {"rows": rows, "savings": savings, "table": table}


def _row(cfg, label, sols, reference, solve, params):
    ms = ij.diagnostics.time_calls({"c": (solve, (params,))}, cfg.repeats)["c"]
    return dict(
        chain=label,
        total_steps=int(sols.num_steps.sum()),
        steps_per_problem=round(float(sols.num_steps.mean()), 2),
        converged=bool(jnp.all(sols.converged)),
        max_error=float(jnp.max(jnp.abs(sols.value - reference))),
        ms=round(ms, 2),
    )


def _plot(cfg, per_problem, workdir):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, (label, steps) in enumerate(per_problem.items()):
        style = "-" if label.endswith("warm") else "--"
        k = np.arange(1, len(steps) + 1)
        axes[0].plot(k, steps, style, color=f"C{i // 2}", label=label, lw=1.2)
        axes[1].plot(k, np.cumsum(steps), style, color=f"C{i // 2}", label=label)
    axes[0].set(
        xlabel="DDIM step k (problem in the chain)",
        ylabel=f"solver steps to {cfg.atol:g}",
        title="steps per problem",
    )
    axes[1].set(
        xlabel="DDIM step k (problem in the chain)",
        ylabel="solver steps, cumulative",
        title=f"a DEQ along {cfg.steps} diffusion timesteps",
    )
    for ax in axes:
        ax.legend(fontsize=7)
    workdir.savefig(fig, "warmstart_sequence.png")
