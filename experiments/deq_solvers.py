"""Picard vs Anderson vs Broyden on the same DEQ: training curves and forward cost.

1. The same DEQ classifier on digits (same cell, data, seed, tolerance) trained
   once per solver: test accuracy and mean forward steps per epoch.
2. Every solver on the same trained model (the first variant's): the residual
   after each step, averaged over the test set, and the steps each needs to reach
   `eval_stop`'s tolerance, per example (mean, max) and the fraction that converged.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import iterjax as ij
from iterjax.experiments import deq_digits
from iterjax.experiments.common import deq_models as dm
from iterjax.lab.config import Spec
from iterjax.lab.registry import build
from iterjax.lab.spec import Stop
from iterjax.lab.tables import markdown_table

_SOLVERS = (Spec("picard"), Spec("anderson"), Spec("broyden"))


@dataclasses.dataclass(frozen=True)
class Config:
    train: dm.TrainConfig = dm.TrainConfig(epochs=30, max_steps=50)
    models: tuple[dm.Variant, ...] = tuple(
        dm.Variant(s.name, cell="dense", solver=s) for s in _SOLVERS
    )
    eval_stop: Stop = Stop(atol=1e-5, max_steps=100)


def run(cfg: Config, workdir) -> dict:
    histories, rows, models = {}, [], []
    total = len(cfg.models) * cfg.train.epochs
    with workdir.progress(total, "training") as advance:
        for v in cfg.models:
            model, hist = dm.train(v, cfg.train, workdir.log, advance)
            histories[v.label] = hist
            rows.append(deq_digits.summarise(v, model, hist))
            models.append(model)
    forward, traces = forward_cost(cfg, models[0], workdir)
    deq_digits.plot(histories, workdir, "deq_solvers_training.png")
    plot_traces(cfg, traces, workdir)
    return {
        "rows": rows,
        "forward": forward,
        "table": deq_digits.table(rows) + "\n\n" + forward_table(cfg, forward),
    }


def forward_cost(cfg, model, workdir):
    """Every solver of `cfg.models` on `model`'s cell, per test example."""
    _, _, xte, _ = dm.load_data(cfg.train)
    x = jnp.asarray(xte)
    cell = model.deq.cell
    z0 = jnp.zeros((model.hidden,), x.dtype)
    out, traces = [], {}
    for v in cfg.models:
        solver = build("solver", v.solver)

        @jax.jit
        def solve(x, solver=solver):
            return jax.vmap(
                lambda x: ij.fixed_point(
                    lambda z, x: cell(z, x),
                    z0,
                    x,
                    solver=solver,
                    **cfg.eval_stop.kwargs(),
                    trace=True,
                )
            )(x)

        sol = solve(x)
        row = dict(
            solver=v.solver.label,
            mean_steps=float(jnp.mean(sol.num_steps)),
            max_steps=int(jnp.max(sol.num_steps)),
            converged=float(jnp.mean(sol.converged)),
        )
        workdir.log(kind="forward", **row)
        out.append(row)
        traces[v.solver.label] = _geometric_mean(np.asarray(sol.trace))
    return out, traces


def _geometric_mean(traces):
    """Mean of log residuals over examples; finished solves (NaN after their last
    step) hold their last residual."""
    logs = np.log(traces)
    for t in range(1, logs.shape[1]):
        logs[:, t] = np.where(np.isnan(logs[:, t]), logs[:, t - 1], logs[:, t])
    return np.exp(np.mean(logs, axis=0))


def plot_traces(cfg, traces, workdir):
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, tr in traces.items():
        ax.semilogy(np.arange(1, len(tr) + 1), tr, label=label)
    ax.axhline(cfg.eval_stop.atol, color="k", lw=0.5, ls="--")
    ax.set(xlabel="step", ylabel="|cell(z) - z|_max (geometric mean over test set)")
    ax.set_title("forward solvers on the same trained DEQ")
    ax.legend()
    ax.grid(alpha=0.3)
    workdir.savefig(fig, "deq_solvers_forward.png")


def forward_table(cfg, rows):
    to = f"mean steps to {cfg.eval_stop.atol:g}"
    headers = ["solver", to, "max steps", "converged"]
    cells = lambda r: [
        r["solver"],
        f"{r['mean_steps']:.1f}",
        r["max_steps"],
        f"{100 * r['converged']:.0f}%",
    ]
    return markdown_table(headers, map(cells, rows))
