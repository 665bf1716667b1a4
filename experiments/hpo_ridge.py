"""Per-feature ridge penalties: every hypergradient method against the closed form.

Data: sklearn's diabetes (442 x 10, bundled), standardised, split train /
validation. Inner: g(w, θ) = |X w - y|² / 2n + ½ Σ_j e^{θ_j} w_j²; outer: the
validation loss f(w) = |X_v w - y_v|² / 2n_v. Closed form, with
H = XᵀX/n + diag(e^θ) and w* = H⁻¹ Xᵀy/n:

    ∇F(θ) = -e^θ ⊙ w* ⊙ H⁻¹ ∇_w f(w*).

For each method and budget (CG iterations, Neumann terms, M-FAC's gradient
samples m, unrolled / forward steps K, truncation T, penalty λ): relative error
against the closed form, cost (inner gradients and Hessian-vector products),
compiled temp memory and time of the jitted hypergradient. Then the penalties
themselves are tuned by Adam on the implicit hypergradient, and the validation
loss before and after is recorded.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from sklearn.datasets import load_diabetes

import iterjax as ij
from iterjax import bilevel as bl
from iterjax.diagnostics import compiled_memory, time_calls
from iterjax.internal import optax_init, optax_step
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Family:
    name: Literal[
        "implicit_cg",
        "implicit_neumann",
        "implicit_mfac",
        "unrolled",
        "truncated",
        "forward",
        "penalty",
    ]
    budgets: tuple[float, ...]
    steps: Count = 1000  # inner steps of truncated and penalty


@dataclasses.dataclass(frozen=True)
class Config:
    train_size: Count = 300
    theta0: float = 0.0  # log penalty of every feature
    methods: tuple[Family, ...] = (
        Family("implicit_cg", (1, 2, 4, 8, 16)),
        Family("implicit_neumann", (4, 16, 64, 256, 1024)),
        Family("implicit_mfac", (10, 30, 100, 300)),
        Family("unrolled", (10, 30, 100, 300, 1000)),
        Family("truncated", (1, 10, 30, 100, 300), steps=1000),
        Family("forward", (10, 30, 100, 300, 1000)),
        Family("penalty", (1, 10, 100, 1000, 10000), steps=2000),
    )
    repeats: Count = 5
    tune_steps: Count = 100
    tune_lr: Positive = 0.1
    seed: int = 0
    x64: bool = True  # float64 (set by the lab for the run)


def load(cfg):
    x, y = load_diabetes(return_X_y=True)
    rng = np.random.default_rng(cfg.seed)
    idx = rng.permutation(len(x))
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    tr, va = idx[: cfg.train_size], idx[cfg.train_size :]
    return tuple(jnp.asarray(a, jnp.float64) for a in (x[tr], y[tr], x[va], y[va]))


def problem(X, y, Xv, yv):
    n, nv = X.shape[0], Xv.shape[0]
    inner = lambda w, t: (
        jnp.sum((X @ w - y) ** 2) / (2 * n) + 0.5 * jnp.sum(jnp.exp(t) * w**2)
    )
    outer = lambda w, t: jnp.sum((Xv @ w - yv) ** 2) / (2 * nv)

    def exact(t):
        H = X.T @ X / n + jnp.diag(jnp.exp(t))
        w = jnp.linalg.solve(H, X.T @ y / n)
        v = jnp.linalg.solve(H, Xv.T @ (Xv @ w - yv) / nv)
        return -jnp.exp(t) * w * v, H

    return inner, outer, exact


def method(family, budget, step, X, theta0, seed=0):
    """The `iterjax.bilevel` method of a family at a budget; `step` = 1/λ_max(H).

    M-FAC's m gradients are m training rows drawn without replacement, with
    damping e^{θ₀}: at θ = θ₀ (every penalty e^{θ₀}) its operator e^{θ₀} I + GᵀG/m
    is an unbiased subsample of H = e^{θ₀} I + XᵀX/n, and H itself at m = n."""
    sgd = optax.sgd(step)
    b = int(budget)

    def mfac():
        rows = np.random.default_rng(seed).permutation(X.shape[0])[:b]
        return bl.Implicit(ij.MFAC(X[rows], float(np.exp(theta0))))

    return {
        "implicit_cg": lambda: bl.Implicit(ij.CG(rtol=0.0, max_steps=b)),
        "implicit_neumann": lambda: bl.Implicit(ij.Neumann(b, damping=step)),
        "implicit_mfac": mfac,
        "unrolled": lambda: bl.Unrolled(sgd, b),
        "truncated": lambda: bl.Truncated(sgd, family.steps, b),
        "forward": lambda: bl.Forward(sgd, b),
        "penalty": lambda: bl.Penalty(sgd, family.steps, lam=float(budget)),
    }[family.name]()


def run(cfg: Config, workdir) -> dict:
    X, y, Xv, yv = load(cfg)
    inner, outer, exact = problem(X, y, Xv, yv)
    theta = jnp.full(X.shape[1], cfg.theta0, X.dtype)  # strongly typed: one compile
    w0 = jnp.zeros(X.shape[1])
    ref, H = exact(theta)
    eigs = jnp.linalg.eigvalsh(H)
    step = float(1.0 / eigs[-1])
    rows = []
    total = sum(len(f.budgets) for f in cfg.methods)
    with workdir.progress(total, "hypergradients") as advance:
        for fam in cfg.methods:
            for budget in fam.budgets:
                m = method(fam, budget, step, X, cfg.theta0, cfg.seed)
                f = lambda t, m=m: ij.hypergradient(
                    outer, inner, t, w0, method=m, return_info=True
                )
                jf = jax.jit(f)
                hg = jf(theta)
                err = jnp.linalg.norm(hg.grad - ref) / jnp.linalg.norm(ref)
                row = dict(
                    method=fam.name,
                    budget=budget,
                    rel_err=float(err),
                    inner_grads=int(hg.cost["inner_grads"]),
                    outer_grads=int(hg.cost["outer_grads"]),
                    hvps=int(hg.cost["hvps"]),
                    temp_kib=compiled_memory(f, theta)["temp"] / 1024,
                    ms=time_calls({"h": (jf, (theta,))}, cfg.repeats)["h"],
                )
                workdir.log(**row)
                rows.append(row)
                advance()
    tuning = tune(cfg, inner, outer, theta, w0, workdir)
    plot(rows, workdir)
    return {
        "condition_number": float(eigs[-1] / eigs[0]),
        "rows": rows,
        "tuning": tuning,
        "table": table(rows)
        + f"\n\ntuned penalties: validation loss {tuning['val_loss_first']:.4f} -> "
        f"{tuning['val_loss_last']:.4f} in {cfg.tune_steps} Adam steps",
    }


def tune(cfg, inner, outer, theta, w0, workdir):
    """Adam on θ with the implicit hypergradient: validation loss before/after."""
    opt = optax.adam(cfg.tune_lr)

    @jax.jit
    def step(theta, state):
        hg = ij.hypergradient(outer, inner, theta, w0, return_info=True)
        theta, state = optax_step(opt, hg.grad, state, theta)
        return theta, state, hg.value

    state, losses = optax_init(opt, theta), []
    for i in range(cfg.tune_steps):
        theta, state, value = step(theta, state)
        losses.append(float(value))
        workdir.log(kind="tune", step=i, val_loss=float(value))
    return {"val_loss_first": losses[0], "val_loss_last": losses[-1]}


def plot(rows, workdir):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        calls = [r["inner_grads"] + r["hvps"] for r in rs]
        a1.loglog(calls, [max(r["rel_err"], 1e-16) for r in rs], "o-", label=name)
        a2.loglog(calls, [r["temp_kib"] for r in rs], "o-", label=name)
    a1.set(xlabel="inner gradients + HVPs", ylabel="relative error vs closed form")
    a2.set(xlabel="inner gradients + HVPs", ylabel="compiled temp memory (KiB)")
    for a in (a1, a2):
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    fig.suptitle("hypergradients of per-feature ridge penalties (diabetes)")
    workdir.savefig(fig, "hpo_ridge.png")


def table(rows):
    headers = ["method", "budget", "rel. error", "inner grads", "HVPs", "temp KiB"]
    cells = lambda r: [
        r["method"],
        f"{r['budget']:g}",
        f"{r['rel_err']:.1e}",
        r["inner_grads"],
        r["hvps"],
        f"{r['temp_kib']:.1f}",
        f"{r['ms']:.2f}",
    ]
    return markdown_table(headers + ["ms"], [cells(r) for r in rows])
