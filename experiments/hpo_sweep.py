"""One stochastic bilevel solver tuning L2 penalties: the experiment made for sweeps.

The `hpo_logreg` problem (per-feature penalties of logistic regression on
breast_cancer or digits, held-out loss as the metric) solved by one stochastic
solver (`solver`: SOBA, SABA, AmIGO, StocBiO or F2SA) for a budget of per-sample
oracle calls. `trial(cfg)` is the whole run as one pure function of the step
sizes and the minibatch seed (`ARRAY_KEYS`), so a `sweep:` over
`solver.outer_lr` x `solver.inner_lr` x seeds trains every member at once as one
`jax.vmap`. The data split (`split_seed`) is fixed across members.
`solver.inner_lr` is in units of 1/L, as in `hpo_logreg`.
"""

import dataclasses
import types
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bilevel_runs as runs  # noqa: E402
from experiments import hpo_logreg  # noqa: E402
from iterjax.config import ConfigError  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    dataset: Literal["breast_cancer", "digits"] = "digits"
    solver: runs.Solver = runs.Solver("soba", outer_lr=1.0, inner_lr=0.5)
    theta0: float = -2.0
    batch: int = 32
    budget: float = 1e6
    evals: int = 20
    val_fraction: float = 0.25
    test_fraction: float = 0.25
    split_seed: int = 0
    seed: int = 0  # the minibatch stream
    x64: bool = True

    def __post_init__(self):
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


def curve(cfg: Config):
    """(oracle calls, held-out loss, test accuracy) at `evals` points; pure in
    the `ARRAY_KEYS` fields."""
    split = types.SimpleNamespace(
        seed=cfg.split_seed,
        val_fraction=cfg.val_fraction,
        test_fraction=cfg.test_fraction,
    )
    with jax.ensure_compile_time_eval():  # the data are constants, not traced
        (train, val, test), classes = hpo_logreg.load(cfg.dataset, split)
        X = np.asarray(train[0])
    inner, outer, ce, d = hpo_logreg.problem(train, val, classes)
    L = np.linalg.eigvalsh(X.T @ X / len(X))[-1] / 2 + np.exp(cfg.theta0)
    s = dataclasses.replace(cfg.solver, inner_lr=cfg.solver.inner_lr / L)
    n, m = len(X), len(val[0])
    solver = runs.make_solver(s, inner, outer, n, m)
    chunk, steps, per_step = runs.chunked(
        solver, n, m, cfg.batch, cfg.budget, cfg.evals
    )

    def evaluated(state, key):
        state = chunk(state, key)
        pred = jnp.argmax(test[0] @ state.w, -1).astype(test[1].dtype)
        acc = jnp.mean((pred == test[1]).astype(state.w.dtype))
        return state, (ce(state.w, *test), acc)

    state = solver.init(jnp.full(d, cfg.theta0), jnp.zeros((d + 1, classes)))
    keys = jax.random.split(jax.random.key(cfg.seed), cfg.evals)
    _, (loss, acc) = jax.lax.scan(evaluated, state, keys)
    calls = per_step * steps * np.arange(1, cfg.evals + 1)
    return calls, loss, acc


def trial(cfg: Config) -> dict:
    """The metrics of one run, pure in the `ARRAY_KEYS` fields of `cfg`."""
    return _metrics(*curve(cfg)[1:])


def _metrics(loss, acc):
    return {"test_loss": loss[-1], "best_test_loss": jnp.min(loss), "test_acc": acc[-1]}


def run(cfg: Config, workdir) -> dict:
    calls, loss, acc = jax.jit(lambda: curve(cfg))()
    for c, lo, a in zip(np.asarray(calls), np.asarray(loss), np.asarray(acc)):
        workdir.log(oracles=int(c), test_loss=float(lo), test_acc=float(a))
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.semilogx(np.asarray(calls), np.asarray(loss), "o-", ms=3)
    ax.set(
        xlabel="per-sample oracle calls",
        ylabel="held-out loss",
        title=f"{cfg.solver.name} on {cfg.dataset}",
    )
    ax.grid(alpha=0.3, which="both")
    workdir.savefig(fig, "hpo_sweep.png")
    metrics = jax.tree.map(float, _metrics(loss, acc))
    return {"metrics": metrics}
