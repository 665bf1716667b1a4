"""One fixed-point solver on random contractions: the experiment made for sweeps.

A single run solves one random problem (`problem`, `dim`, contraction `radius`,
`seed`) with one `solver` and reports its steps, residual and convergence, with
the residual trace plotted. Its `trial(cfg)` is a pure function of the
array-valued keys in `ARRAY_KEYS`, so a `sweep:` over seeds, radii, tolerances
or the solver's damping runs as one `jax.vmap` (sharded over a `mesh:` when the
config has one); a sweep over solvers runs one vectorised group per solver.
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
from iterjax.lab.spec import Count, Positive


@dataclasses.dataclass(frozen=True)
class Config:
    problem: Literal["tanh_deq", "slow_system"] = "tanh_deq"
    dim: Count = 64
    radius: Positive = 0.9  # the contraction's largest singular value / eigenvalue
    solver: Annotated[Spec, "solver"] = Spec("anderson")
    atol: Positive = 1e-8
    max_steps: Count = 2000
    seed: int = 0
    x64: bool = True


# The keys a sweep may vectorise over: everything `trial` reads as an array.
ARRAY_KEYS = (
    "seed",
    "radius",
    "atol",
    "solver.damping",
    "solver.mixing",
    "solver.regularization",
)


def _solve(cfg, trace=False):
    fn, args, y0 = PROBLEMS[cfg.problem](dim=cfg.dim, radius=cfg.radius, seed=cfg.seed)
    return ij.fixed_point(
        fn,
        y0,
        args,
        solver=build("solver", cfg.solver),
        atol=cfg.atol,
        max_steps=cfg.max_steps,
        trace=trace,
    )


def trial(cfg: Config) -> dict:
    """The metrics of one run, pure in the `ARRAY_KEYS` fields of `cfg`."""
    return _metrics(_solve(cfg))


def _metrics(sol):
    return {
        "steps": sol.num_steps,
        "residual": sol.residual,
        "converged": sol.converged.astype(jnp.float32),
    }


def run(cfg: Config, workdir) -> dict:
    sol = jax.jit(lambda: _solve(cfg, trace=True))()
    metrics = jax.tree.map(float, _metrics(sol))
    workdir.log(**metrics)
    trace = np.asarray(sol.trace)
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogy(np.arange(1, len(trace) + 1), trace)
    ax.axhline(cfg.atol, color="k", lw=0.5, ls="--")
    ax.set(
        xlabel="step",
        ylabel="|f(y) - y|",
        title=f"{cfg.solver.label} on {cfg.problem} (radius {cfg.radius})",
    )
    workdir.savefig(fig, "residual.png")
    return {"metrics": metrics}
