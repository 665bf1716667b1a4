"""Linear solvers and preconditioners on Poisson and Darcy systems of growing size.

-∇·(k∇u) = 1 on n x n interior grids (`iterjax.gallery.Poisson2D`, 5 points,
matrix-free), or n x n x n ones with `ndim: 3` (`Poisson3D`, 7 points), with
k = 1 (`poisson`) or k = exp(σ g), g a smoothed white noise
(`lognormal`, `iterjax.gallery.lognormal_coefficient`: about 4σ e-folds of
contrast), for every n in `grids` and every linear solver of `solvers`, each
to ‖b - Ax‖₂ <= `rtol` ‖b‖₂. The solvers are registry specs, so any solver
and preconditioner a config names is measured (`{name: cg, preconditioner:
{name: multigrid, coarsening: galerkin}}`).

Reported per (field, n, solver): operator products as the solver counts them
(a preconditioner's work in fine-grid products included), the true relative
residual recomputed here, `converged`, and the median time of the jitted solve
(its setup, such as probing Galerkin coarse levels, inside; smoothed-aggregation
AMG's hierarchy is set up on the host when the solve is traced, outside the
time: `benchmarks/linear.py` times it apart). Issue 38's
targets: CG + multigrid >= 20x fewer products than CG, with counts flat in the
grid size (32² -> 256²).
"""

import dataclasses
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt

import iterjax as ij
from iterjax.gallery import Poisson2D, Poisson3D, lognormal_coefficient
from iterjax.lab.config import Spec
from iterjax.lab.registry import build
from iterjax.lab.spec import Count, NonNegative, Positive
from iterjax.lab.tables import markdown_table

Field = Literal["poisson", "lognormal"]
OPERATORS = {2: Poisson2D, 3: Poisson3D}


@dataclasses.dataclass(frozen=True)
class Config:
    grids: tuple[Count, ...] = (31, 63, 127, 255)
    ndim: Literal[2, 3] = 2  # the grid's dimension: n^ndim unknowns
    fields: tuple[Field, ...] = ("poisson", "lognormal")
    sigma: NonNegative = 1.0  # the lognormal field's log-standard deviation
    width: Count = 4  # its smoothing (box filter) width, in grid points
    solvers: tuple[Annotated[Spec, "linear_solver"], ...] = (
        Spec("cg"),
        Spec("cg", (("preconditioner", "jacobi"),)),
        Spec("cg", (("preconditioner", {"name": "multigrid"}),)),
        Spec(
            "cg",
            (("preconditioner", {"name": "multigrid", "coarsening": "galerkin"}),),
        ),
        Spec("cg", (("preconditioner", "amg"),)),
    )
    rtol: Positive = 1e-8
    repeats: Count = 5
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        for s in self.solvers:
            if "rtol" in s.kwargs():
                raise ValueError(
                    f"solver {s.label}: give the tolerance once, as the top-level "
                    "`rtol` (every solver stops at it)"
                )
        for n in self.grids:
            if (n + 1) & n:
                raise ValueError(
                    f"`grids` must hold sides 2^j - 1 (multigrid halves them down "
                    f"to one point), got {n}"
                )


def coefficient(cfg, field, n):
    if field == "poisson":
        return jnp.ones((n,) * cfg.ndim)
    k = lognormal_coefficient(n, cfg.sigma, cfg.width, cfg.seed, ndim=cfg.ndim)
    return jnp.asarray(k)


def run(cfg: Config, workdir) -> dict:
    rows = []
    total = len(cfg.fields) * len(cfg.grids) * len(cfg.solvers)
    with workdir.progress(total, "solving") as advance:
        for field in cfg.fields:
            for n in cfg.grids:
                op = OPERATORS[cfg.ndim](coefficient(cfg, field, n))
                b = jnp.ones((n,) * cfg.ndim)
                for s in cfg.solvers:
                    solver = build("linear_solver", s)
                    solve = jax.jit(
                        lambda b, solver=solver, op=op: solver.solve_with_stats(
                            op, b, rtol=cfg.rtol
                        )
                    )
                    x, stats = solve(b)
                    residual = jnp.linalg.norm(b - op(x)) / jnp.linalg.norm(b)
                    timed = {"s": (solve, (b,))}
                    ms = ij.diagnostics.time_calls(timed, cfg.repeats)["s"]
                    row = dict(
                        field=field,
                        n=n,
                        solver=s.label,
                        products=int(stats.num_matvecs),
                        residual=float(residual),
                        converged=bool(stats.converged),
                        ms=ms,
                    )
                    workdir.log(**row)
                    rows.append(row)
                    advance()
    _plot(cfg, rows, workdir)
    return {"rows": rows, "table": _table(rows)}


def _table(rows):
    head = ["field", "n", "solver", "products", "rel. residual", "converged", "ms"]
    body = [
        [
            r["field"],
            r["n"],
            r["solver"],
            r["products"],
            f"{r['residual']:.1e}",
            r["converged"],
            f"{r['ms']:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(head, body)


def _plot(cfg, rows, workdir):
    fig, axes = plt.subplots(
        1, len(cfg.fields), figsize=(5 * len(cfg.fields), 4), squeeze=False
    )
    for ax, field in zip(axes[0], cfg.fields, strict=True):
        for label in dict.fromkeys(r["solver"] for r in rows):
            mine = [r for r in rows if (r["field"], r["solver"]) == (field, label)]
            ns, products = [r["n"] for r in mine], [r["products"] for r in mine]
            ax.loglog(ns, products, "o-", label=label)
        ax.set(title=field, xlabel="grid side n", ylabel="operator products")
        ax.legend(fontsize=6)
    workdir.savefig(fig, "linear_solvers.png")
