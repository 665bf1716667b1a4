"""One stochastic bilevel solver on one problem: the bilevel experiment made for sweeps.

`problem`: `hpo_logreg` (per-feature L2 penalties of logistic regression on
`dataset`, breast_cancer or digits) or `data_hypercleaning` (per-sample weights
on digits with half the training labels corrupted, that experiment's default
data), solved by one stochastic solver (`solver`: SOBA, SABA, AmIGO, StocBiO or
F2SA) for a budget of per-sample oracle calls; held-out loss and accuracy
recorded. `trial(cfg)` is the whole run as one pure function of the step sizes
and the minibatch seed (`ARRAY_KEYS`), so a `sweep:` over `solver.outer_lr` x
`solver.inner_lr` x seeds trains every member at once as one `jax.vmap`. The
data (`split_seed`) are fixed across members. `solver.inner_lr` is in units of
1/L, as in the two experiments, so tuned values carry over to their configs.
"""

import dataclasses
import types
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from iterjax.experiments import data_hypercleaning, hpo_logreg
from iterjax.experiments.common import bilevel_runs as runs
from iterjax.lab.config import ConfigError
from iterjax.lab.spec import Count, Fraction, Positive


@dataclasses.dataclass(frozen=True)
class Config:
    problem: Literal["hpo_logreg", "data_hypercleaning"] = "hpo_logreg"
    dataset: Literal["breast_cancer", "digits"] = "digits"  # hpo_logreg's
    solver: runs.Solver = runs.Solver("soba", outer_lr=1.0, inner_lr=0.5)
    theta0: float | None = None  # None: the problem's own (log penalty -2 / logit 0)
    batch: Count = 32
    budget: Positive = 1e6
    evals: Count = 20
    val_fraction: Fraction = 0.25
    test_fraction: Fraction = 0.25
    split_seed: int = 0
    seed: int = 0  # the minibatch stream
    x64: bool = True

    def __post_init__(self):
        if self.problem == "data_hypercleaning" and self.dataset != "digits":
            raise ConfigError(
                "config key `dataset`: data_hypercleaning is on digits; "
                "`dataset` chooses hpo_logreg's data"
            )
        if self.solver.name == "implicit":
            raise ConfigError(
                "config key `solver.name`: hpo_sweep runs a stochastic solver "
                "(soba, saba, amigo, stocbio, f2sa); the implicit baseline is in "
                "hpo_logreg"
            )


ARRAY_KEYS = (
    "seed",
    "solver.outer_lr",
    "solver.inner_lr",
    "solver.lam",
    "solver.lam_growth",
)


def problem(cfg: Config) -> runs.Problem:
    if cfg.problem == "data_hypercleaning":
        data_cfg = data_hypercleaning.Config(seed=cfg.split_seed)
        theta0 = data_hypercleaning.THETA0 if cfg.theta0 is None else cfg.theta0
        return data_hypercleaning.problem(data_cfg, theta0)[0]
    split = types.SimpleNamespace(
        seed=cfg.split_seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
        theta0=hpo_logreg.Config.theta0 if cfg.theta0 is None else cfg.theta0,
    )
    return hpo_logreg.problem(cfg.dataset, split)


def curve(cfg: Config):
    """(oracle calls, held-out loss, test accuracy) at `evals` points; pure in
    the `ARRAY_KEYS` fields."""
    with jax.ensure_compile_time_eval():  # the data are constants, not traced
        p = problem(cfg)
    s = dataclasses.replace(cfg.solver, inner_lr=cfg.solver.inner_lr / p.L)
    solver = runs.make_solver(s, p.inner, p.outer, p.n, p.m)
    chunk = runs.chunked(solver, p.n, p.m, cfg.batch, cfg.budget, cfg.evals)

    def evaluated(state, key):
        state, calls = chunk(state, key)
        return state, (calls, p.test(state.w))

    state = solver.init(p.theta0, p.w0)
    keys = jax.random.split(jax.random.key(cfg.seed), cfg.evals)
    _, (calls, (loss, acc)) = jax.lax.scan(evaluated, state, keys)
    return jnp.cumsum(calls), loss, acc


def trial(cfg: Config) -> dict:
    """The metrics of one run, pure in the `ARRAY_KEYS` fields of `cfg`, and
    under `rows` the rows `run` logs (what a sweep's `target:` is searched in)."""
    calls, loss, acc = curve(cfg)
    rows = {"oracles": calls, "test_loss": loss, "test_acc": acc}
    return {**_metrics(loss, acc), "rows": rows}


def _metrics(loss, acc):
    return {
        "test_loss": loss[-1],
        "best_test_loss": jnp.min(loss),
        "test_acc": acc[-1],
        "best_test_acc": jnp.max(acc),
    }


def label(cfg: Config) -> str:
    return cfg.dataset if cfg.problem == "hpo_logreg" else cfg.problem


def run(cfg: Config, workdir) -> dict:
    calls, loss, acc = jax.jit(lambda: curve(cfg))()
    for c, lo, a in zip(np.asarray(calls), np.asarray(loss), np.asarray(acc)):
        workdir.log(oracles=int(c), test_loss=float(lo), test_acc=float(a))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogx(np.asarray(calls), np.asarray(loss), "o-", ms=3)
    ax.set(
        xlabel="per-sample oracle calls",
        ylabel="held-out loss",
        title=f"{cfg.solver.name} on {label(cfg)}",
    )
    ax.grid(alpha=0.3, which="both")
    workdir.savefig(fig, "hpo_sweep.png")
    metrics = jax.tree.map(float, _metrics(loss, acc))
    return {"metrics": metrics}
