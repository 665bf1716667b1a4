r"""Bloop on an auxiliary task: lower the auxiliary loss at no cost in training loss.

The simple bilevel problem min L_aux(w) over w ∈ argmin L_main(w). A linear
one-vs-rest regression on sklearn's digits (64 pixels + bias -> 10 scores, 650
weights) fits `main_size` training digits: with fewer samples than weights,
L_main's minimisers form an affine set, and plain SGD from 0 picks the one its
path leads to. The auxiliary loss is the same regression on `aux_size` other
digits. Methods, each minibatch SGD on the main loss (`batch` samples a step)
for `steps` steps, from w = 0, with `seeds` minibatch orders as one `jax.vmap`:

* `main`: the training gradient alone;
* `sum λ`: g_main + λ g_aux, the weighted sum (λ in `sum_weights`);
* `bloop λ`: `iterjax.bilevel.bloop(λ, decay)`: g_main + λ π(g_aux; m), the
  auxiliary gradient's part orthogonal to an EMA m of training gradients (λ in
  `aux_weights`);
* `projection λ`: the same with decay 0, projecting on each noisy minibatch
  gradient (the paper's ablation: without the EMA).

Reported per method: the final L_main and L_aux (full sets) and the held-out
accuracy, mean ± sd over seeds.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_digits

from iterjax import bilevel as bl
from iterjax.lab.spec import Count, Fraction, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    main_size: Count = 40
    aux_size: Count = 400
    batch: Count = 8
    steps: Count = 20000
    lr: Positive = 0.05
    aux_weights: tuple[Positive, ...] = (0.1, 0.3, 1.0)  # λ of bloop, projection
    decay: Fraction = 0.9  # bloop's EMA
    sum_weights: tuple[Positive, ...] = (0.03, 0.1, 0.3, 1.0)
    seeds: Count = 5
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        if self.batch > self.main_size:
            raise ValueError(f"`batch` ({self.batch}) must be <= `main_size`")


def data(cfg):
    """(main, aux, test) sets of (standardised pixels and a bias, one-hot targets)."""
    x, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(cfg.seed).permutation(len(x))
    x = (x - x.mean(0)) / (x.std(0) + 1.0)  # constant pixels stay 0
    x = np.concatenate([x, np.ones((len(x), 1))], 1)
    onehot = np.eye(10)[y]
    cuts = np.cumsum([cfg.main_size, cfg.aux_size])
    parts = np.split(idx, cuts)
    as_set = lambda i: (jnp.asarray(x[i]), jnp.asarray(onehot[i]))
    return as_set(parts[0]), as_set(parts[1]), as_set(parts[2])


def loss(w, xy):
    x, y = xy
    return 0.5 * jnp.mean(jnp.sum((x @ w - y) ** 2, -1))


def accuracy(w, xy):
    x, y = xy
    return jnp.mean((jnp.argmax(x @ w, -1) == jnp.argmax(y, -1)).astype(w.dtype))


def methods(cfg):
    """name -> (optax transform, how it combines (g_main, g_aux))."""
    sgd = optax.sgd(cfg.lr)
    out = {"main": (sgd, lambda gm, ga: gm)}
    for lam in cfg.sum_weights:
        out[f"sum {lam:g}"] = (sgd, lambda gm, ga, lam=lam: gm + lam * ga)
    pair = lambda gm, ga: (gm, ga)
    for lam in cfg.aux_weights:
        out[f"bloop {lam:g}"] = (optax.chain(bl.bloop(lam, cfg.decay), sgd), pair)
    for lam in cfg.aux_weights:
        out[f"projection {lam:g}"] = (optax.chain(bl.bloop(lam, 0.0), sgd), pair)
    return out


def train(cfg, main, aux, opt, combine, key):
    """w after `steps` steps: main-loss minibatches, the full auxiliary loss."""
    x, y = main

    def step(carry, k):
        w, state = carry
        idx = jax.random.choice(k, cfg.main_size, (cfg.batch,), replace=False)
        g_main = jax.grad(loss)(w, (x[idx], y[idx]))
        g_aux = jax.grad(loss)(w, aux)
        updates, state = opt.update(combine(g_main, g_aux), state, w)
        return (optax.apply_updates(w, updates), state), None

    w0 = jnp.zeros((x.shape[1], 10))
    keys = jax.random.split(key, cfg.steps)
    return jax.lax.scan(step, (w0, opt.init(w0)), keys)[0][0]


def run(cfg: Config, workdir) -> dict:
    main, aux, test = data(cfg)
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.seeds)
    rows = []
    table = methods(cfg)
    with workdir.progress(len(table), "methods") as advance:
        for name, (opt, combine) in table.items():
            trained = jax.jit(
                jax.vmap(lambda k: train(cfg, main, aux, opt, combine, k))
            )(keys)
            stats = {
                "main_loss": jax.vmap(lambda w: loss(w, main))(trained),
                "aux_loss": jax.vmap(lambda w: loss(w, aux))(trained),
                "test_acc": jax.vmap(lambda w: accuracy(w, test))(trained),
            }
            row = {"method": name}
            for key, values in stats.items():
                row[key] = float(jnp.mean(values))
                row[key + "_sd"] = float(jnp.std(values))
            workdir.log(**row)
            rows.append(row)
            advance()
    _plot(rows, workdir)
    return dict(rows=rows, table=_table(rows))


def _plot(rows, workdir):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for family, marker in (
        ("main", "s"),
        ("sum", "o-"),
        ("bloop", "^-"),
        ("projection", "v-"),
    ):
        mine = [r for r in rows if r["method"].split()[0] == family]
        ax.plot(
            [r["main_loss"] for r in mine],
            [r["aux_loss"] for r in mine],
            marker,
            label=family,
        )
    ax.set(xscale="log", xlabel="training loss L_main", ylabel="auxiliary loss L_aux")
    ax.legend(fontsize=8)
    workdir.savefig(fig, "bloop_multitask.png")


def _table(rows):
    headers = ["method", "L_main", "L_aux", "test accuracy"]
    cells = lambda r: [
        r["method"],
        f"{r['main_loss']:.2e} ± {r['main_loss_sd']:.0e}",
        f"{r['aux_loss']:.4f} ± {r['aux_loss_sd']:.4f}",
        f"{100 * r['test_acc']:.1f}% ± {100 * r['test_acc_sd']:.1f}",
    ]
    return markdown_table(headers, map(cells, rows))
