"""Sinkhorn, Anderson-Sinkhorn and Sinkhorn-Newton as the regularisation shrinks.

Entropic OT between two point clouds of `points` points in the unit square
(squared Euclidean cost, random positive weights), solved to a relative marginal
error of `atol` for each ε: Sinkhorn (`Picard`), Anderson-accelerated Sinkhorn,
Sinkhorn-Newton (`Switched(Picard(), Backtracking(Newton()), after=warmup)`:
`warmup` Sinkhorn steps, then Newton steps with a line search; GMRES on exact
Jacobian-vector products) and Sinkhorn-Newton-Sparse (the same with
`SparseNewton(density)`: CG on the Hessian of the plan sparsified to the
`density` largest entries of each column). Reported: iterations (Newton:
Sinkhorn warm-up plus Newton steps), median wall time of the jitted solve,
the marginal error ‖P1 - a‖₁ + ‖Pᵀ1 - b‖₁. The seed's claim
(Sinkhorn-Newton-Sparse, Tang et al. 2024): orders of magnitude fewer
iterations than Sinkhorn at small ε.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import iterjax as ij
from iterjax.classical import SparseNewton, marginal_error, sinkhorn
from iterjax.lab.spec import Count, Fraction, NonNegativeInt, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    points: Count = 200
    epsilons: tuple[Positive, ...] = (0.1, 0.03, 0.01, 0.003, 0.001)
    atol: Positive = 1e-10
    warmup: NonNegativeInt = 20  # Sinkhorn steps before Newton's
    density: Fraction = 0.1  # the sparse Newton's kept fraction of each column
    max_steps: Count = 20000
    repeats: Count = 5  # timed calls per solve (the median is reported)
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        if not self.epsilons:
            raise ValueError("`epsilons` must not be empty")


def solvers(cfg):
    return {
        "sinkhorn": ij.Picard(),
        "anderson": ij.Anderson(),
        "sinkhorn-newton": ij.Switched(
            ij.Picard(), ij.Backtracking(ij.Newton()), after=cfg.warmup
        ),
        "sinkhorn-newton-sparse": ij.Switched(
            ij.Picard(),
            ij.Backtracking(SparseNewton(cfg.density)),
            after=cfg.warmup,
        ),
    }


def problem(points, seed):
    """(cost, a, b): two clouds in the unit square, cost |x - y|², weights in
    [0.5, 1.5] normalised to sum 1."""
    rng = np.random.default_rng(seed)
    x, y = rng.uniform(size=(points, 2)), rng.uniform(size=(points, 2))
    cost = ((x[:, None] - y[None]) ** 2).sum(-1)
    a, b = rng.uniform(0.5, 1.5, points), rng.uniform(0.5, 1.5, points)
    return jnp.asarray(cost), jnp.asarray(a / a.sum()), jnp.asarray(b / b.sum())


def run(cfg: Config, workdir) -> dict:
    cost, a, b = problem(cfg.points, cfg.seed)
    rows, traces = [], {}
    table = solvers(cfg)
    with workdir.progress(len(cfg.epsilons) * len(table), "solving") as advance:
        for eps in cfg.epsilons:
            for name, solver in table.items():
                solve = jax.jit(
                    lambda c, eps=eps, solver=solver: sinkhorn(
                        c,
                        a,
                        b,
                        eps,
                        solver=solver,
                        atol=cfg.atol,
                        max_steps=cfg.max_steps,
                        trace=True,
                    )
                )
                sol = solve(cost)
                ms = ij.diagnostics.time_calls({"f": (solve, (cost,))}, cfg.repeats)
                row = dict(
                    epsilon=eps,
                    solver=name,
                    iterations=int(sol.num_steps),
                    converged=bool(sol.converged),
                    marginal_error=float(marginal_error(cost, a, b, sol.value, eps)),
                    ms=round(ms["f"], 2),
                )
                workdir.log(**row)
                rows.append(row)
                traces[(eps, name)] = np.asarray(sol.trace)
                advance()
    _plot(cfg, rows, traces, workdir)
    ratios = _ratios(rows)
    text = (
        _table(rows)
        + "\n\nAt the smallest epsilon, Sinkhorn / Sinkhorn-Newton: "
        + f"{ratios['iterations']:.1f}x the iterations, {ratios['time']:.1f}x the time"
    )
    return {"rows": rows, "smallest_epsilon": ratios, "table": text}


def _ratios(rows):
    eps = min(r["epsilon"] for r in rows)
    at = {r["solver"]: r for r in rows if r["epsilon"] == eps}
    plain, newton = at["sinkhorn"], at["sinkhorn-newton"]
    return {
        "epsilon": eps,
        "iterations": plain["iterations"] / newton["iterations"],
        "time": plain["ms"] / newton["ms"],
    }


def _table(rows):
    head = ["epsilon", "solver", "iterations", "converged", "marginal error", "ms"]
    body = [
        [
            f"{r['epsilon']:g}",
            r["solver"],
            r["iterations"],
            r["converged"],
            f"{r['marginal_error']:.1e}",
            r["ms"],
        ]
        for r in rows
    ]
    return markdown_table(head, body)


def _plot(cfg, rows, traces, workdir):
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.4))
    names = list(solvers(cfg))
    for i, name in enumerate(names):
        mine = [r for r in rows if r["solver"] == name]
        eps = [r["epsilon"] for r in mine]
        axes[0].loglog(eps, [r["iterations"] for r in mine], "o-", label=name)
        axes[1].loglog(eps, [r["ms"] for r in mine], "o-", label=name)
        trace = traces[(min(cfg.epsilons), name)]
        axes[2].semilogy(np.arange(1, len(trace) + 1), trace, label=name, color=f"C{i}")
    axes[0].set(xlabel="ε", ylabel=f"iterations to {cfg.atol:g}", title="iterations")
    axes[1].set(xlabel="ε", ylabel="wall time (ms, median)", title="wall time")
    axes[2].set(
        xlabel="iteration",
        ylabel="residual (max |log Pᵀ1/b|)",
        title=f"ε = {min(cfg.epsilons):g}",
        xscale="log",
    )
    for ax in axes:
        ax.legend(fontsize=8)
    axes[0].invert_xaxis()
    axes[1].invert_xaxis()
    workdir.savefig(fig, "sinkhorn_newton.png")
