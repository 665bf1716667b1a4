"""Data hyper-cleaning on digits: learn per-sample weights of corrupted labels.

sklearn's digits (bundled): a training set with a fraction of its labels replaced
by random wrong classes, a clean validation set and a test set. Inner problem:
weighted multinomial logistic regression,

    g(w, θ) = mean_i σ(θ_i) CE(x_i w, y_i) + (μ/2) |w|²,

outer problem: the clean validation cross-entropy f(w) (F2SA's MNIST experiment
at small scale). Each stochastic bilevel solver (SOBA, SABA, AmIGO, StocBiO,
F2SA; minibatches) and the deterministic implicit baseline (full-batch
`hypergradient` with implicit CG, Adam on θ, warm-started inner solves) get the
same budget of per-sample oracle calls (gradients and Hessian-vector products,
times the batch size). Recorded against oracle calls: test accuracy of the inner
iterate, and the fraction of corrupted samples whose weight σ(θ_i) fell below
one half.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from experiments import bilevel_runs as runs  # noqa: E402
from iterjax.run import markdown_table  # noqa: E402

CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Config:
    train_size: int = 1000
    val_size: int = 300
    corruption: float = 0.5
    l2: float = 1e-3
    batch: int = 64
    budget: float = 2e6  # per-sample oracle calls per solver
    evals: int = 40  # evaluation points along the budget
    solvers: tuple[runs.Solver, ...] = (
        runs.Solver("implicit", outer_lr=1.0),
        runs.Solver("soba"),
        runs.Solver("saba"),
        runs.Solver("amigo"),
        runs.Solver("stocbio"),
        runs.Solver("f2sa"),
    )
    seed: int = 0


def load(cfg):
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    rng = np.random.default_rng(cfg.seed)
    idx = rng.permutation(len(x))
    x = np.concatenate([x / 16.0, np.ones((len(x), 1))], axis=1)  # bias feature
    tr = idx[: cfg.train_size]
    va = idx[cfg.train_size : cfg.train_size + cfg.val_size]
    te = idx[cfg.train_size + cfg.val_size :]
    y_tr = y[tr].copy()
    corrupt = rng.random(len(tr)) < cfg.corruption
    y_tr[corrupt] = (y_tr[corrupt] + rng.integers(1, CLASSES, corrupt.sum())) % CLASSES
    as_j = lambda a, dt=jnp.float64: jnp.asarray(a, dt)
    return dict(
        x=as_j(x[tr]),
        y=as_j(y_tr, jnp.int32),
        xv=as_j(x[va]),
        yv=as_j(y[va], jnp.int32),
        xt=as_j(x[te]),
        yt=as_j(y[te], jnp.int32),
        corrupt=jnp.asarray(corrupt),
    )


def losses(data, l2):
    def ce(w, x, y):
        logp = jax.nn.log_softmax(x @ w)
        return -jnp.take_along_axis(logp, y[:, None], 1)[:, 0]

    def inner(w, theta, idx):
        weights = jax.nn.sigmoid(theta[idx])
        data_term = jnp.mean(weights * ce(w, data["x"][idx], data["y"][idx]))
        return data_term + 0.5 * l2 * jnp.sum(w**2)

    def outer(w, theta, idx):
        return jnp.mean(ce(w, data["xv"][idx], data["yv"][idx]))

    return inner, outer


def evaluate(data, w, theta) -> dict:
    pred = jnp.argmax(data["xt"] @ w, -1).astype(data["yt"].dtype)
    acc = jnp.mean((pred == data["yt"]).astype(w.dtype))
    corrupt = data["corrupt"].astype(w.dtype)
    down = (jax.nn.sigmoid(theta) < 0.5).astype(w.dtype)
    caught = jnp.sum(corrupt * down) / jnp.sum(corrupt)
    return {"acc": float(acc), "caught": float(caught)}


def run(cfg: Config, workdir) -> dict:
    jax.config.update("jax_enable_x64", True)
    data = load(cfg)
    inner, outer = losses(data, cfg.l2)
    curves, rows = {}, []
    with workdir.progress(len(cfg.solvers), "solvers") as advance:
        for s in cfg.solvers:
            curve = runs.run(
                s,
                inner,
                outer,
                jnp.zeros(cfg.train_size),
                jnp.zeros((65, CLASSES)),
                n=cfg.train_size,
                m=cfg.val_size,
                batch=cfg.batch,
                budget=cfg.budget,
                evals=cfg.evals,
                evaluate=lambda w, t: evaluate(data, w, t),
                seed=cfg.seed,
            )
            for point in curve:
                workdir.log(solver=s.name, **point)
            curves[s.name] = curve
            best = max(curve, key=lambda p: p["acc"])
            rows.append(
                dict(
                    solver=s.name,
                    final_acc=curve[-1]["acc"],
                    best_acc=best["acc"],
                    caught=curve[-1]["caught"],
                    oracles_to_best=best["oracles"],
                    seconds=curve[-1]["seconds"],
                )
            )
            advance()
    summary = compare(curves, rows)
    plot(curves, workdir)
    return {"rows": rows, **summary, "table": table(rows, summary)}


def compare(curves, rows):
    """Oracle calls each solver needs to reach the implicit baseline's best."""
    target = max(p["acc"] for p in curves["implicit"]) if "implicit" in curves else 1
    reach = {}
    for name, curve in curves.items():
        hit = [p["oracles"] for p in curve if p["acc"] >= target]
        reach[name] = hit[0] if hit else None
    return {"baseline_best_acc": target, "oracles_to_baseline_best": reach}


def plot(curves, workdir):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name, curve in curves.items():
        x = [p["oracles"] for p in curve]
        a1.semilogx(x, [100 * p["acc"] for p in curve], label=name)
        a2.semilogx(x, [100 * p["caught"] for p in curve], label=name)
    a1.set(xlabel="per-sample oracle calls", ylabel="test accuracy (%)")
    a2.set(
        xlabel="per-sample oracle calls", ylabel="corrupted samples down-weighted (%)"
    )
    for a in (a1, a2):
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.suptitle("data hyper-cleaning, digits")
    workdir.savefig(fig, "data_hypercleaning.png")


def table(rows, summary):
    reach = summary["oracles_to_baseline_best"]
    headers = ["solver", "final test acc", "best", "corrupted down-weighted"]
    cells = lambda r, hit: [
        r["solver"],
        f"{100 * r['final_acc']:.1f}%",
        f"{100 * r['best_acc']:.1f}%",
        f"{100 * r['caught']:.0f}%",
        "-" if hit is None else f"{hit:.2g}",
    ]
    rows = [cells(r, reach[r["solver"]]) for r in rows]
    return markdown_table(headers + ["oracles to implicit's best"], rows)
