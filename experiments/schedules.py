"""Learning-rate schedules for SGD on a logistic-regression suite (PAPERS.md §3.13).

Data bundled with scikit-learn (digits, breast_cancer, wine) and MNIST-1D's
training split (generated offline), standardised, with a bias feature. The
problem: multinomial logistic regression with a small ridge term,
f(W) = mean cross-entropy + ½ λ |W|², strongly convex, so its minimum f* is
found to 1e-10 by Newton-CG (`iterjax.argmin`) and every run is scored by its
last iterate's suboptimality f(W_T) - f*. `mnist1d_mlp` is MNIST-1D with a
one-hidden-layer tanh MLP (`mlp_hidden` units, LeCun-normal start): non-convex,
f* unknown, so its "gap" is the loss itself (f* := 0). SGD (minibatches drawn
with replacement) runs `steps` steps from W = 0 (the MLP: its start) under each
schedule:

* `constant`: η; `linear`: η (1 - t/T); `cosine`: η (1 + cos(π t/T)) / 2;
* `sgdr`: `sgdr_cycles` cosine cycles with warm restarts (optax's `sgdr_schedule`);
* `refined`: η times the refined weights of Defazio et al. (2023), built from
  the minibatch gradient norms of the `linear` run at its best η (seed mean),
  median-smoothed (`iterjax.tuning.refined_schedule`);
* `schedule_free`: schedule-free SGD (`optax.contrib.schedule_free_sgd`, scored
  at its evaluation point x);
* `polyak`: stochastic Polyak steps capped at η (`optax.polyak_sgd`, f_min = 0);
* `nag_gs`: NAG-GS (Leplat et al.), the semi-implicit Gauss-Seidel step of a
  Nesterov-type SDE (`iterjax.nag_gs`), step η, μ = `nag_mu`, γ₀ = `nag_gamma`,
  no schedule.

Each schedule's η is tuned on the grid `lr_grid`, the grid and `seeds` seeds
trained as one `jax.vmap`; the best η minimises the seed-mean final
suboptimality. Reported at that η: the mean and spread (standard deviation over
seeds) of the last iterate's suboptimality, and the steps to reach the target
gap `target_gap` (f - f* <= target_gap · (f(0) - f*), seed mean; checked every
`eval_every` steps). The paper's claim, linear decay matching or beating cosine,
is counted over the datasets.
"""

import dataclasses
from typing import Literal, get_args

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import iterjax as ij
from iterjax.experiments.common.logreg import load, mlp_objective, objective
from iterjax.lab.spec import Count, Fraction, NonNegative, Positive
from iterjax.lab.tables import markdown_table
from iterjax.tuning import refined_schedule

Schedule = Literal[
    "constant",
    "linear",
    "cosine",
    "sgdr",
    "refined",
    "schedule_free",
    "polyak",
    "nag_gs",
]


@dataclasses.dataclass(frozen=True)
class Config:
    datasets: tuple[
        Literal["digits", "breast_cancer", "wine", "mnist1d", "mnist1d_mlp"], ...
    ] = ("digits", "breast_cancer", "wine", "mnist1d", "mnist1d_mlp")
    schedules: tuple[Schedule, ...] = get_args(Schedule)  # all of them
    steps: Count = 1000
    batch: Count = 16
    l2: NonNegative = 1e-3  # λ
    nag_mu: Positive = 1.0  # NAG-GS's μ and γ₀
    nag_gamma: Positive = 1.0
    lr_grid: tuple[Positive, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
    seeds: Count = 5
    sgdr_cycles: Count = 2
    mlp_hidden: Count = 32
    smoothing: Fraction = 0.1  # the refined schedule's median filter, of T
    target_gap: Positive = 1e-2  # of f(0) - f*
    eval_every: Count = 10
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        if "refined" in self.schedules and "linear" not in self.schedules:
            raise ValueError("`schedules`: `refined` is built from the `linear` run")
        if self.steps % self.eval_every:
            raise ValueError(
                f"`steps`={self.steps} must be a multiple of `eval_every`="
                f"{self.eval_every}"
            )


def _problem(data, cfg):
    """(f, W0, f*, rows): f* by Newton-CG, or 0 for the (non-convex) MLP."""
    X, Y, classes = load(data.removesuffix("_mlp"))
    if data.endswith("_mlp"):
        key = jax.random.key(cfg.seed)
        f, W0 = mlp_objective(X, Y, cfg.l2, cfg.mlp_hidden, key)
        return f, W0, 0.0, X.shape[0]
    f = objective(X, Y, cfg.l2)
    W0 = jnp.zeros((X.shape[1], classes))
    best = ij.argmin(lambda W, _: f(W), W0, atol=1e-10, max_steps=100)
    return f, W0, float(f(best.value)), X.shape[0]


def shape(name, cfg, refined=None):
    """Schedule `name` with peak 1 (η multiplies it, traced under the grid's vmap)."""
    T = cfg.steps
    if name == "constant":
        return optax.constant_schedule(1.0)
    if name == "linear":
        return optax.linear_schedule(1.0, 0.0, T)
    if name == "cosine":
        return optax.cosine_decay_schedule(1.0, T)
    if name == "sgdr":
        cycle = dict(init_value=1.0, peak_value=1.0, warmup_steps=0)
        length = T // cfg.sgdr_cycles
        return optax.sgdr_schedule([{**cycle, "decay_steps": length}] * cfg.sgdr_cycles)
    if name == "refined":
        return refined_schedule(1.0, refined, cfg.smoothing)
    raise ValueError(f"unknown schedule {name!r}")


def optimizer(name, lr, cfg, refined=None):
    """The optax transformation of schedule `name` at peak rate `lr`."""
    if name == "schedule_free":
        return optax.contrib.schedule_free_sgd(lr)
    if name == "polyak":
        return optax.polyak_sgd(max_learning_rate=lr, f_min=0.0)
    if name == "nag_gs":  # (η as a schedule: it is traced under the grid's vmap)
        return ij.nag_gs(lambda _: lr, mu=cfg.nag_mu, gamma=cfg.nag_gamma)
    unit = shape(name, cfg, refined)
    # optax's schedules of an int32 count compute in float32: give them η's float
    return optax.sgd(lambda t: lr * unit(jnp.asarray(t, jnp.result_type(lr))))


def train(f, n, W0, cfg, name, refined=None):
    """`trial(lr, key) -> (losses (T / eval_every,), grad norms (T,))`."""

    def trial(lr, key):
        tx = optimizer(name, lr, cfg, refined)

        def step(carry, key):
            W, state = carry
            idx = jax.random.randint(key, (cfg.batch,), 0, n)
            value, g = jax.value_and_grad(f)(W, idx)
            upd, state = tx.update(g, state, W, value=value)
            return (optax.apply_updates(W, upd), state), optax.global_norm(g)

        def chunk(carry, keys):
            carry, norms = jax.lax.scan(step, carry, keys)
            W, state = carry
            if name == "schedule_free":
                W = optax.contrib.schedule_free_eval_params(state, W)
            return carry, (f(W), norms)

        keys = jax.random.split(key, cfg.steps).reshape(
            cfg.steps // cfg.eval_every, cfg.eval_every, -1
        )
        _, (losses, norms) = jax.lax.scan(chunk, (W0, tx.init(W0)), keys)
        return losses, norms.reshape(-1)

    return trial


def run(cfg: Config, workdir) -> dict:
    lrs = jnp.asarray(cfg.lr_grid)
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.seeds)
    order: list[str] = [s for s in cfg.schedules if s != "refined"]
    order += ["refined"] if "refined" in cfg.schedules else []
    rows: list[dict] = []
    curves: dict = {}
    total = len(cfg.datasets) * len(order)
    with workdir.progress(total, "training") as advance:
        for data in cfg.datasets:
            f, W0, f_star, count = _problem(data, cfg)
            f0 = float(f(W0))
            norms = None
            for name in order:
                trial = train(f, count, W0, cfg, name, norms)
                grid = jax.vmap(jax.vmap(trial, (None, 0)), (0, None))
                losses, grad_norms = jax.jit(grid)(lrs, keys)  # (lr, seed, ...)
                gaps = np.asarray(losses) - f_star
                final = np.where(np.isfinite(gaps[:, :, -1]), gaps[:, :, -1], np.inf)
                i = int(np.argmin(final.mean(1)))
                if name == "linear":
                    norms = np.asarray(grad_norms[i]).mean(0)
                mean = gaps[i].mean(0)
                reached = np.flatnonzero(mean <= cfg.target_gap * (f0 - f_star))
                row = dict(
                    dataset=data,
                    schedule=name,
                    best_lr=float(cfg.lr_grid[i]),
                    final_gap=float(mean[-1]),
                    final_gap_std=float(gaps[i, :, -1].std()),
                    steps_to_target=(
                        int((reached[0] + 1) * cfg.eval_every) if reached.size else None
                    ),
                )
                workdir.log(**row)
                rows.append(row)
                curves[data, name] = mean
                advance()
    _plot(cfg, curves, workdir)
    by = {(r["dataset"], r["schedule"]): r for r in rows}
    linear_wins = [
        d
        for d in cfg.datasets
        if ("linear" in cfg.schedules and "cosine" in cfg.schedules)
        and by[d, "linear"]["final_gap"] <= by[d, "cosine"]["final_gap"]
    ]
    head = [
        "dataset",
        "schedule",
        "best η",
        "f(W_T) - f* (mean ± sd)",
        "steps to target",
    ]
    body = [
        [
            r["dataset"],
            r["schedule"],
            r["best_lr"],
            f"{r['final_gap']:.2e} ± {r['final_gap_std']:.1e}",
            r["steps_to_target"] if r["steps_to_target"] is not None else "not reached",
        ]
        for r in rows
    ]
    return {
        "rows": rows,
        "linear_at_least_cosine": len(linear_wins),
        "datasets": len(cfg.datasets),
        "table": markdown_table(head, body),
    }


def _plot(cfg, curves, workdir):
    fig, axes = plt.subplots(
        1, len(cfg.datasets), figsize=(4.6 * len(cfg.datasets), 4), squeeze=False
    )
    t = np.arange(1, cfg.steps // cfg.eval_every + 1) * cfg.eval_every
    for ax, data in zip(axes[0], cfg.datasets, strict=True):
        for name in cfg.schedules:
            ax.plot(t, np.maximum(curves[data, name], 1e-16), label=name)
        ax.set(
            xlabel="SGD step",
            ylabel="f(W_t) - f* (seed mean, best η)",
            title=data,
            yscale="log",
        )
    axes[0][0].legend(fontsize=7)
    workdir.savefig(fig, "schedules.png")
