"""Fixed-point study: every solver on every problem, iterations and residual traces.

For each (problem, solver) pair: steps and function evaluations (JVPs counted
separately) to reach `atol` in the chosen `norm`, the final residual, the median
wall time of the jitted solve, and the residual after each step (plotted). Then,
for each adjoint, the gradient of a loss through the DEQ cell against a tight
reference (Newton forward, GMRES backward to 1e-13): relative error, cosine and
time of `jax.grad`.

The problems: a DEQ cell, a slow system (spectral radius 0.98), a pytree map,
and gradient descent's map of a logistic loss from a far start (saturated
sigmoids), where full Newton steps diverge: there Newton's damping schedule
(`Newton(smoothness=M)`, the O(k⁻³) schedule of "Newton Method Revisited") and the
Armijo line search (`Backtracking(Newton())`) both converge.
"""

import dataclasses
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import iterjax as ij
from iterjax.experiments.common.problems import PROBLEMS
from iterjax.lab.config import Spec
from iterjax.lab.registry import build
from iterjax.lab.spec import Count, NonNegative
from iterjax.lab.tables import markdown_table

Problem = Literal["tanh_deq", "slow_system", "pytree", "logistic"]
NORMS = {"max": ij.max_norm, "two": ij.two_norm, "rms": ij.rms_norm}


@dataclasses.dataclass(frozen=True)
class Config:
    problems: tuple[Problem, ...] = ("tanh_deq", "slow_system", "pytree", "logistic")
    solvers: tuple[Annotated[Spec, "solver"], ...] = (
        Spec("picard"),
        Spec("anderson"),
        Spec("broyden"),
        Spec("newton"),
        Spec("halpern"),
    )
    adjoints: tuple[Annotated[Spec, "adjoint"], ...] = (
        Spec("implicit"),
        Spec("implicit", (("linear_solver", {"name": "richardson"}),)),
        Spec("unrolled"),
        Spec("phantom", (("steps", 1),)),
    )
    norm: Literal["max", "two", "rms"] = "max"
    dim: Count = 64
    atol: NonNegative = 1e-8
    max_steps: Count = 1000
    repeats: Count = 5
    seed: int = 0
    x64: bool = True


def _time(f, x, repeats):
    return ij.diagnostics.time_calls({"f": (f, (x,))}, repeats)["f"]


def run(cfg: Config, workdir) -> dict:
    rows, traces = [], {}
    total = len(cfg.problems) * len(cfg.solvers)
    with workdir.progress(total, "solving") as advance:
        for pname in cfg.problems:
            make = PROBLEMS[pname]
            fn, args, y0 = make(dim=cfg.dim, seed=cfg.seed)
            for s in cfg.solvers:
                solver = build("solver", s)
                solve = jax.jit(
                    lambda a, fn=fn, y0=y0, solver=solver: ij.fixed_point(
                        fn,
                        y0,
                        a,
                        solver=solver,
                        atol=cfg.atol,
                        max_steps=cfg.max_steps,
                        norm=NORMS[cfg.norm],
                        trace=True,
                    )
                )
                sol = solve(args)
                counter = ij.diagnostics.EvalCounter(fn)
                jax.block_until_ready(
                    ij.fixed_point(
                        counter.fn,
                        y0,
                        args,
                        solver=solver,
                        atol=cfg.atol,
                        max_steps=cfg.max_steps,
                        norm=NORMS[cfg.norm],
                    ).value
                )
                evals = counter.read()
                row = dict(
                    problem=pname,
                    solver=s.label,
                    steps=int(sol.num_steps),
                    f_evals=evals["f"],
                    jvps=evals["jvp"],
                    converged=bool(sol.converged),
                    residual=float(sol.residual),
                    ms=_time(solve, args, cfg.repeats),
                )
                workdir.log(**row)
                rows.append(row)
                traces[(pname, s.label)] = np.asarray(sol.trace)
                advance()

    grads = _gradient_check(cfg, workdir)
    _plot(cfg, traces, workdir)
    table = _table(rows) + "\n\n" + _grad_table(grads)
    return {"rows": rows, "gradients": grads, "table": table}


def _gradient_check(cfg, workdir):
    fn, (w, x), y0 = PROBLEMS["tanh_deq"](dim=cfg.dim, seed=cfg.seed)
    c = jnp.linspace(-1.0, 1.0, x.shape[0])

    def grad_fn(adjoint, solver=ij.Anderson(), atol=1e-12):
        loss = lambda x: (
            c
            @ ij.fixed_point(
                fn,
                y0,
                (w, x),
                solver=solver,
                atol=atol,
                max_steps=cfg.max_steps,
                adjoint=adjoint,
            ).value
        )
        return jax.jit(jax.grad(loss))

    exact = ij.ImplicitAdjoint(ij.GMRES(rtol=1e-13))
    ref = grad_fn(exact, solver=ij.Newton(), atol=1e-13)(x)
    out = {}
    for s in cfg.adjoints:
        g = grad_fn(build("adjoint", s))
        value = g(x)
        norms = jnp.linalg.norm(value) * jnp.linalg.norm(ref)
        row = {
            "adjoint": s.label,
            "rel_err": float(jnp.linalg.norm(value - ref) / jnp.linalg.norm(ref)),
            "cosine": float(value @ ref / norms),
            "grad_ms": _time(g, x, cfg.repeats),
        }
        workdir.log(kind="gradient", **row)
        out[row["adjoint"]] = row
    return out


def _plot(cfg, traces, workdir):
    fig, axes = plt.subplots(
        1, len(cfg.problems), figsize=(5 * len(cfg.problems), 4), squeeze=False
    )
    for ax, pname in zip(axes[0], cfg.problems):
        for (p, label), tr in traces.items():
            if p == pname:
                ax.semilogy(np.arange(1, len(tr) + 1), tr, label=label)
        ax.axhline(cfg.atol, color="k", lw=0.5, ls="--")
        ax.set(title=pname, xlabel="step", ylabel=f"|f(y) - y| ({cfg.norm} norm)")
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    workdir.savefig(fig, "residuals.png")


def _table(rows):
    headers = ["problem", "solver", "steps", "f evals", "JVPs", "converged"]
    keys = ("problem", "solver", "steps", "f_evals", "jvps", "converged")
    cells = lambda r: [r[k] for k in keys] + [f"{r['residual']:.1e}", f"{r['ms']:.3f}"]
    return markdown_table(headers + ["residual", "ms"], map(cells, rows))


def _grad_table(grads):
    headers = ["adjoint", "rel. error vs exact", "cosine", "grad ms"]
    cells = lambda g: [
        g["adjoint"],
        f"{g['rel_err']:.1e}",
        f"{g['cosine']:.6f}",
        f"{g['grad_ms']:.3f}",
    ]
    return markdown_table(headers, map(cells, grads.values()))
