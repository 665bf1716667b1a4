"""Per-feature L2 penalties of logistic regression, tuned by every bilevel solver.

Data bundled with scikit-learn: breast_cancer (569 x 30, 2 classes) and digits
(1797 x 64, 10 classes), standardised, split train / validation / test. Inner:
multinomial logistic regression on the training set with one penalty per
feature, g(w, θ) = mean CE + ½ Σ_f e^{θ_f} |w_f|² (bias unpenalised); outer: the
validation cross-entropy. Each solver (the full-batch implicit baseline and the
stochastic SOBA, SABA, AmIGO, StocBiO, F2SA on minibatches) gets the same budget
of per-sample oracle calls; recorded against calls and wall time: the held-out
(test) loss and accuracy of the current inner iterate.

Step sizes: `inner_lr` is in units of 1/L, L the smoothness constant of g at θ0
(the largest eigenvalue of XᵀX/2n plus the largest penalty), so one setting
serves both datasets.
"""

import dataclasses
from typing import Literal

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from sklearn import datasets

import iterjax as ij
from iterjax.experiments.common import bilevel_runs as runs
from iterjax.lab.spec import Count, Fraction, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    datasets: tuple[Literal["breast_cancer", "digits"], ...] = (
        "breast_cancer",
        "digits",
    )
    val_fraction: Fraction = 0.25
    test_fraction: Fraction = 0.25
    theta0: float = -2.0  # initial log penalty of every feature
    batch: Count = 32
    budget: Positive = 1e6
    evals: Count = 30
    solvers: tuple[runs.Solver, ...] = (
        runs.Solver("implicit", outer_lr=1.0),
        runs.Solver("soba", outer_lr=1.0, inner_lr=0.5),
        runs.Solver("saba", outer_lr=1.0, inner_lr=0.5),
        runs.Solver("amigo", outer_lr=1.0, inner_lr=0.5),
        runs.Solver("stocbio", outer_lr=1.0, inner_lr=0.5),
        runs.Solver("f2sa", outer_lr=1.0, inner_lr=0.5),
    )
    seed: int = 0
    x64: bool = True  # float64 (set by the lab for the run)


def load(name, cfg):
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    rng = np.random.default_rng(cfg.seed)
    idx = rng.permutation(len(x))
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)  # bias feature, last
    nv, nt = int(cfg.val_fraction * len(x)), int(cfg.test_fraction * len(x))
    parts = np.split(idx, [len(x) - nv - nt, len(x) - nt])
    f64 = lambda a: jnp.asarray(a, jnp.float64)
    i32 = lambda a: jnp.asarray(a, jnp.int32)
    return [(f64(x[p]), i32(y[p])) for p in parts], int(y.max()) + 1


def problem(name, cfg) -> runs.Problem:
    """The bilevel problem on dataset `name` (split by `cfg.seed`,
    `cfg.val_fraction`, `cfg.test_fraction`), started at log penalties
    `cfg.theta0`."""
    (train, val, test), classes = load(name, cfg)
    (X, Y), (Xv, Yv) = train, val
    d = X.shape[1] - 1

    def inner(w, theta, idx):
        penalty = 0.5 * jnp.sum(jnp.exp(theta)[:, None] * w[:d] ** 2)
        return runs.classifier_metrics(w, X[idx], Y[idx])[0] + penalty

    def outer(w, theta, idx):
        return runs.classifier_metrics(w, Xv[idx], Yv[idx])[0]

    return runs.Problem(
        inner,
        outer,
        theta0=jnp.full(d, cfg.theta0),
        w0=jnp.zeros((d + 1, classes)),
        n=len(X),
        m=len(Xv),
        L=runs.softmax_smoothness(X) + float(np.exp(cfg.theta0)),
        test=lambda w: runs.classifier_metrics(w, *test),
    )


def run(cfg: Config, workdir) -> dict:
    rows, curves = [], {}
    total = len(cfg.datasets) * len(cfg.solvers)
    with workdir.progress(total, "solvers") as advance:
        for name in cfg.datasets:
            p = problem(name, cfg)

            def evaluate(w, theta, p=p):
                loss, acc = p.test(w)
                return {"test_loss": float(loss), "test_acc": float(acc)}

            # The held-out loss with the initial penalties, inner problem solved.
            full = jnp.arange(p.n)
            g = lambda w, t, p=p: p.inner(w, t, full)
            w_untuned = ij.argmin(g, p.w0, p.theta0, atol=1e-8).value
            untuned = evaluate(w_untuned, None)["test_loss"]
            workdir.log(dataset=name, solver="untuned", test_loss=untuned)
            for s in cfg.solvers:
                curve = runs.run(
                    s,
                    p,
                    batch=cfg.batch,
                    budget=cfg.budget,
                    evals=cfg.evals,
                    evaluate=evaluate,
                    seed=cfg.seed,
                )
                for point in curve:
                    workdir.log(dataset=name, solver=s.name, **point)
                curves[(name, s.name)] = curve
                first, last = curve[0], curve[-1]
                rows.append(
                    dict(
                        dataset=name,
                        solver=s.name,
                        untuned_test_loss=untuned,
                        test_loss_first=first["test_loss"],
                        test_loss=last["test_loss"],
                        best_test_loss=min(q["test_loss"] for q in curve),
                        test_acc=last["test_acc"],
                        seconds=last["seconds"],
                    )
                )
                advance()
    plot(cfg, curves, workdir)
    return {"rows": rows, "table": table(rows)}


def plot(cfg, curves, workdir):
    k = len(cfg.datasets)
    fig, axes = plt.subplots(k, 2, figsize=(12, 4 * k), squeeze=False)
    for row, name in zip(axes, cfg.datasets):
        for s in cfg.solvers:
            curve = curves[(name, s.name)]
            loss = [p["test_loss"] for p in curve]
            row[0].semilogx([p["oracles"] for p in curve], loss, label=s.name)
            row[1].semilogx([p["seconds"] for p in curve], loss, label=s.name)
        row[0].set(xlabel="per-sample oracle calls", ylabel="held-out loss")
        row[1].set(xlabel="seconds (2-core CPU)", ylabel="held-out loss")
        for a in row:
            a.set_title(name)
            a.grid(alpha=0.3, which="both")
            a.legend(fontsize=8)
    workdir.savefig(fig, "hpo_logreg.png")


def table(rows):
    headers = ["dataset", "solver", "held-out loss: untuned", "first eval -> end"]
    cells = lambda r: [
        r["dataset"],
        r["solver"],
        f"{r['untuned_test_loss']:.4f}",
        f"{r['test_loss_first']:.4f} -> {r['test_loss']:.4f}",
        f"{r['best_test_loss']:.4f}",
        f"{100 * r['test_acc']:.1f}%",
        f"{r['seconds']:.2f}",
    ]
    return markdown_table(headers + ["best", "test acc", "s"], map(cells, rows))
