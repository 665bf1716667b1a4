r"""Hyper-representation learning (BO-REP's setting, small): a shared feature map
learned at the upper level, one linear head per task at the lower level.

Tasks from sklearn's digits: each is a binary problem between two digit classes
(`tasks` training tasks and `test_tasks` new ones, pairs drawn at random), with
its own training and validation samples. The representation φ_θ(x) =
tanh(x A + a) (64 -> `features`) is the upper variable θ; each task's head w_i
(features + bias) is its lower variable:

    g(w, θ) = mean_i [ CE_i^train(φ_θ, w_i) + (μ/2) |w_i|² ],
    f(w, θ) = mean_i CE_i^val(φ_θ, w_i),

strongly convex in w, nonconvex in θ (BO-REP's hyper-representation problem;
the paper's is an RNN on text, whose smoothness grows with the gradient). BO-REP
(`normalized_momentum`, a periodically refreshed lower level) and SOBA (SGD on
θ) run for `steps` steps with minibatches of each task's samples. Reported: the
upper loss against steps, and the meta-test accuracy: heads fitted on the new
tasks (`iterjax.argmin`) over each learned representation, against a random one.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

import iterjax as ij
from iterjax import bilevel as bl
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    tasks: Count = 20
    test_tasks: Count = 10
    samples: Count = 40  # per task and split
    features: Count = 16
    mu: Positive = 1e-2  # the heads' ridge
    batch: Count = 16  # samples per task a step
    steps: Count = 2000
    borep_lr: Positive = 0.05  # BO-REP's normalised step
    soba_lr: Positive = 1.0  # SOBA's SGD step on θ
    inner_lr: Positive = 1.0
    seed: int = 0
    x64: bool = True


def make_tasks(cfg, count, rng, x, y):
    """(train x, train y, val x, val y), each with a leading task axis."""
    out = []
    for _ in range(count):
        a, b = rng.choice(10, 2, replace=False)
        idx = np.flatnonzero((y == a) | (y == b))
        pick = rng.choice(idx, 2 * cfg.samples, replace=False)
        label = (y[pick] == a).astype(np.float64)
        out.append(
            (
                x[pick[: cfg.samples]],
                label[: cfg.samples],
                x[pick[cfg.samples :]],
                label[cfg.samples :],
            )
        )
    return tuple(jnp.asarray(np.stack(parts)) for parts in zip(*out))


def features(theta, x):
    A, a = theta
    return jnp.tanh(x @ A + a[None, :])


def task_loss(theta, w, x, y):
    """Mean logistic loss of head w = (weights, bias) on features of x."""
    z = features(theta, x) @ w[:-1] + w[-1]
    return jnp.mean(jax.nn.softplus(z) - y * z)


def losses(cfg, train_x, train_y, val_x, val_y):
    def inner(W, theta, idx):  # W [tasks, features + 1]; idx [tasks, batch]
        per = jax.vmap(
            lambda w, x, y, i: task_loss(theta, w, x[i], y[i]) + 0.5 * cfg.mu * w @ w
        )(W, train_x, train_y, idx)
        return jnp.mean(per)

    def outer(W, theta, idx):
        per = jax.vmap(lambda w, x, y, i: task_loss(theta, w, x[i], y[i]))(
            W, val_x, val_y, idx
        )
        return jnp.mean(per)

    return inner, outer


def run(cfg: Config, workdir) -> dict:
    x, y = load_digits(return_X_y=True)
    x = x / 16.0
    rng = np.random.default_rng(cfg.seed)
    train = make_tasks(cfg, cfg.tasks, rng, x, y)
    new = make_tasks(cfg, cfg.test_tasks, rng, x, y)
    inner, outer = losses(cfg, *train)
    k = jax.random.split(jax.random.PRNGKey(cfg.seed), 2)
    theta0 = (
        jax.random.normal(k[0], (64, cfg.features)) / 8.0,
        jnp.zeros(cfg.features),
    )
    W0 = jnp.zeros((cfg.tasks, cfg.features + 1))
    solvers = {
        "BO-REP": bl.BOREP(
            inner,
            outer,
            bl.normalized_momentum(cfg.borep_lr, 0.9),
            inner_lr=cfg.inner_lr,
            init_steps=100,
            inner_steps=5,
            period=5,
        ),
        "SOBA": bl.SOBA(inner, outer, optax.sgd(cfg.soba_lr), inner_lr=cfg.inner_lr),
    }
    full = jnp.broadcast_to(jnp.arange(cfg.samples), (cfg.tasks, cfg.samples))
    curves, rows = {}, []
    with workdir.progress(len(solvers), "solvers") as advance:
        for name, solver in solvers.items():

            def body(state, key, solver=solver):
                ki, ko = jax.random.split(key)
                pick = lambda k: jax.random.randint(
                    k, (cfg.tasks, cfg.batch), 0, cfg.samples
                )
                state, _ = solver.step(state, pick(ki), pick(ko))
                return state, outer(state.w, state.theta, full)

            keys = jax.random.split(jax.random.PRNGKey(cfg.seed + 1), cfg.steps)
            state, curve = jax.jit(
                lambda: jax.lax.scan(body, solver.init(theta0, W0), keys)
            )()
            curves[name] = np.asarray(curve)
            rows.append(
                dict(
                    method=name,
                    upper_loss=float(curve[-1]),
                    meta_test=meta_test(cfg, state.theta, new),
                )
            )
            workdir.log(**rows[-1])
            advance()
    rows.append(
        dict(
            method="random representation",
            upper_loss=None,  # the starting map: heads fitted on new tasks only
            meta_test=meta_test(cfg, theta0, new),
        )
    )
    _plot(curves, workdir)
    return dict(rows=rows, table=_table(rows))


def meta_test(cfg, theta, tasks):
    """Mean validation accuracy of heads fitted on new tasks' training samples."""
    tx, ty, vx, vy = tasks

    def one(x, y, xv, yv):
        loss = lambda w, t: task_loss(t, w, x, y) + 0.5 * cfg.mu * w @ w
        w = ij.argmin(loss, jnp.zeros(cfg.features + 1), theta).value
        z = features(theta, xv) @ w[:-1] + w[-1]
        return jnp.mean(((z > 0).astype(yv.dtype) == yv).astype(yv.dtype))

    return float(jnp.mean(jax.jit(jax.vmap(one))(tx, ty, vx, vy)))


def _plot(curves, workdir):
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, curve in curves.items():
        ax.semilogy(curve, label=name)
    ax.set(xlabel="step", ylabel="upper loss (validation, all tasks)")
    ax.legend(fontsize=8)
    workdir.savefig(fig, "hyper_representation.png")


def _table(rows):
    headers = ["representation", "upper loss", "meta-test accuracy (new tasks)"]
    cells = lambda r: [
        r["method"],
        "-" if r["upper_loss"] is None else f"{r['upper_loss']:.4f}",
        f"{100 * r['meta_test']:.1f}%",
    ]
    return markdown_table(headers, map(cells, rows))
