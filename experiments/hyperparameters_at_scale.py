"""Hyperparameters at scale: one weight decay per parameter of an MLP (Lorraine,
Vicol & Duvenaud 2020, "Optimizing Millions of Hyperparameters by Implicit
Differentiation").

Data: sklearn's digits (1797 x 64, bundled), standardised, split train /
validation / test. Model: an MLP 64 -> hidden -> 10 (tanh) with parameters w;
θ holds one log weight decay per parameter, as many hyperparameters as
parameters (12,010 at hidden 160). Inner: g(w, θ) = CE_train(w) + ½ Σ_i
e^{θ_i} w_i²; outer: F(θ) = CE_val(w*(θ)). The implicit function theorem gives

    ∇F(θ) = -(e^θ ⊙ w*) ⊙ H⁻¹ ∇_w CE_val(w*),   H = ∇²_w g(w*, θ),

and the methods differ in the inverse-Hessian-vector product: the paper's
truncated Neumann series α Σ_k (I - αH)^k v (α = 1 / λ_max(H), by power
iteration), CG, and M-FAC (the damped empirical Fisher of m per-example
training gradients standing in for H).

Part 1, at θ₀: each method at its budgets against a reference (CG to 1e-10 of
the hypergradient's linear system): relative error, Hessian-vector products,
compiled temp memory and time, beside one inner solve's (the paper: the
hypergradient costs "only a few times more" than training).
Part 2: θ tuned by Adam, one hypergradient a step (the inner problem re-solved
from the last w: L-BFGS, then Newton-CG to the tolerance), with Neumann and CG:
validation and test cross-entropy and accuracy, beside the best single weight
decay of a grid.
"""

import dataclasses
import functools
import time
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits

import iterjax as ij
from iterjax import bilevel as bl
from iterjax.diagnostics import executable_memory, time_calls
from iterjax.internal import optax_init, optax_step
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: Count = 160
    train_size: Count = 500
    val_size: Count = 500
    theta0: float = -4.6  # log weight decay of every parameter (e^-4.6 = 0.01)
    atol: Positive = 1e-6  # |∇_w g|_∞ of the inner solve
    lbfgs_steps: Count = 5000  # L-BFGS steps (at most) before Newton-CG polishes
    reference_steps: Count = 2000  # CG steps of the reference hypergradient
    neumann_terms: tuple[int, ...] = (10, 100, 1000)
    cg_steps: tuple[int, ...] = (5, 20, 80)
    mfac_samples: tuple[int, ...] = (16, 64, 256)
    power_steps: Count = 50  # power iteration for λ_max(H)
    tune_steps: Count = 30
    tune_lr: Positive = 0.1
    tune_methods: tuple[Literal["neumann", "cg"], ...] = ("neumann", "cg")
    tune_neumann: Count = 100  # the budgets of the IHVP while tuning
    tune_cg: Count = 20
    decay_grid: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1)
    repeats: Count = 5
    seed: int = 0
    x64: bool = True  # float64 (set by the lab for the run)


def load(cfg):
    """(train, val, test) pairs (x, y) of digits, standardised on the train set."""
    x, y = load_digits(return_X_y=True)
    idx = np.random.default_rng(cfg.seed).permutation(len(x))
    x = x[idx].astype(np.float64)
    mu, sd = x[: cfg.train_size].mean(0), x[: cfg.train_size].std(0)
    x = (x - mu) / np.where(sd > 0, sd, 1.0)  # (the border pixels are constant)
    cuts = [0, cfg.train_size, cfg.train_size + cfg.val_size, len(x)]
    return [
        (jnp.asarray(x[a:b]), jnp.asarray(y[idx][a:b], jnp.int32))
        for a, b in zip(cuts[:-1], cuts[1:])
    ]


def model(cfg):
    """(w0, predict): the flat initial parameters and logits(w, x)."""
    k1, k2 = jax.random.split(jax.random.key(cfg.seed))
    params = {
        "w1": jax.random.normal(k1, (64, cfg.hidden)) / 8.0,
        "b1": jnp.zeros(cfg.hidden),
        "w2": jax.random.normal(k2, (cfg.hidden, 10)) / np.sqrt(cfg.hidden),
        "b2": jnp.zeros(10),
    }
    w0, unravel = ravel_pytree(params)

    def predict(w, x):
        p = unravel(w)
        hidden = jnp.tanh(x @ p["w1"] + p["b1"][None, :])
        return hidden @ p["w2"] + p["b2"][None, :]

    return w0, predict


def cross_entropy(predict, w, data):
    x, y = data
    logp = jax.nn.log_softmax(predict(w, x))
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def accuracy(predict, w, data):
    x, y = data
    return jnp.mean(jnp.argmax(predict(w, x), axis=1).astype(y.dtype) == y)


def problem(cfg):
    train, val, test = load(cfg)
    w0, predict = model(cfg)
    inner = lambda w, t: (
        cross_entropy(predict, w, train) + 0.5 * jnp.sum(jnp.exp(t) * w**2)
    )
    outer = lambda w, t: cross_entropy(predict, w, val)
    return w0, predict, (train, val, test), inner, outer


def fit(cfg, inner, theta, w):
    """w*(θ): optax's L-BFGS until |∇_w g|_∞ <= atol / 10 or `lbfgs_steps`,
    then argmin to the tolerance, its implicit adjoint attached (no step where
    L-BFGS got there). A speed choice: argmin's line-search Newton-CG alone
    also converges from w0 (at θ0: 54 steps, 1283 HVPs, 145 shrinks, 1.5 s
    against 0.85 s, to another local minimum, loss 0.25013 against 0.25017)."""
    opt = optax.lbfgs()
    loss = lambda w: inner(w, theta)
    value_and_grad = optax.value_and_grad_from_state(loss)

    def body(carry):
        w, state, _, k = carry
        value, grad = value_and_grad(w, state=state)
        updates, state = opt.update(
            grad, state, w, value=value, grad=grad, value_fn=loss
        )
        return optax.apply_updates(w, updates), state, jnp.max(jnp.abs(grad)), k + 1

    def cond(carry):
        _, _, size, k = carry
        # (to a tenth of the tolerance: `size` is the gradient before the step)
        return (size > 0.1 * cfg.atol) & (k < cfg.lbfgs_steps)

    with jax.numpy_dtype_promotion("standard"):  # optax's line search mixes types
        start = (w, opt.init(w), jnp.asarray(jnp.inf, w.dtype), 0)
        w = jax.lax.while_loop(cond, body, start)[0]
    w = jax.lax.stop_gradient(w)
    return ij.argmin(inner, w, theta, atol=cfg.atol, max_steps=256)


def lambda_max(inner, w, theta, steps):
    """λ_max of H = ∇²_w g(w, θ) by power iteration (`steps` HVPs)."""
    hvp = lambda v: jax.jvp(lambda u: jax.grad(inner)(u, theta), (w,), (v,))[1]
    v = jnp.ones_like(w) / jnp.sqrt(w.size)

    def power(_, v):
        hv = hvp(v)
        return hv / jnp.linalg.norm(hv)

    v = jax.lax.fori_loop(0, steps, power, v)
    return jnp.vdot(v, hvp(v))


def per_example_gradients(predict, w, train, m, seed):
    """m per-example gradients of the training cross-entropy at w (rows)."""
    x, y = train
    rows = np.random.default_rng(seed).permutation(x.shape[0])[:m]
    one = lambda xi, yi: jax.grad(
        lambda w: cross_entropy(predict, w, (xi[None], yi[None]))
    )(w)
    return jax.vmap(one)(x[rows], y[rows])


def methods(cfg, step, gradients):
    """(name, budget, make, G) of part 1: the iterjax method is `make(G)`; G is
    M-FAC's m gradient rows (`gradients(m)`), else empty: an argument of the
    compiled hypergradient, not a constant that XLA would fold at compile time."""
    at = lambda ls: bl.Implicit(ls, atol=cfg.atol, max_steps=256)
    damping = float(np.exp(cfg.theta0))
    none = jnp.zeros(0)
    out = [
        ("cg", b, lambda _, b=b: at(ij.CG(rtol=0.0, max_steps=b)), none)
        for b in cfg.cg_steps
    ]
    out += [
        ("neumann", b, lambda _, b=b: at(ij.Neumann(b, damping=step)), none)
        for b in cfg.neumann_terms
    ]
    out += [
        ("mfac", b, lambda G: at(ij.MFAC(G, damping)), gradients(b))
        for b in cfg.mfac_samples
    ]
    return out


def run(cfg: Config, workdir) -> dict:
    w0, predict, (train, val, test), inner, outer = problem(cfg)
    theta = jnp.full(w0.shape, cfg.theta0, w0.dtype)  # strongly typed: one compile
    # compiled once, for every solve (all of one shape) and its memory
    solve = jax.jit(lambda t, w: fit(cfg, inner, t, w)).lower(theta, w0).compile()
    start = time.perf_counter()
    sol = solve(theta, w0)
    w_star = jax.block_until_ready(sol.value)
    first_seconds = time.perf_counter() - start  # compilation included
    lam = float(lambda_max(inner, w_star, theta, cfg.power_steps))
    step = 1.0 / lam

    def hypergradient(make):
        """The compiled hypergradient(θ, w, G) of the method make(G)."""
        f = lambda t, w, G: ij.hypergradient(
            outer, inner, t, w, method=make(G), return_info=True
        )
        return jax.jit(f)

    reference = bl.Implicit(
        ij.CG(rtol=1e-10, max_steps=cfg.reference_steps), atol=cfg.atol
    )
    ref = hypergradient(lambda _: reference)(theta, w_star, jnp.zeros(0))
    solve_ms = time_calls({"s": (solve, (theta, w0))}, cfg.repeats)["s"]
    solve_kib = executable_memory(solve)["temp"] / 1024
    # M-FAC's rows: one draw of the largest m, whose prefixes are the smaller m's
    # (the rows are a prefix of one permutation)
    most = per_example_gradients(
        predict, w_star, train, max(cfg.mfac_samples), cfg.seed
    )
    gradients = lambda m: most[:m]
    rows = []
    todo = methods(cfg, step, gradients)
    with workdir.progress(len(todo) + cfg.tune_steps * 2, "hypergradients") as advance:
        for name, budget, make, G in todo:
            args = (theta, w_star, G)
            jf = hypergradient(make).lower(*args).compile()  # compiled once
            hg = jf(*args)
            err = jnp.linalg.norm(hg.grad - ref.grad) / jnp.linalg.norm(ref.grad)
            row = dict(
                method=name,
                budget=int(budget),
                rel_err=float(err),
                hvps=int(hg.cost["hvps"]),
                temp_kib=executable_memory(jf)["temp"] / 1024,
                ms=time_calls({"h": (jf, args)}, cfg.repeats)["h"],
            )
            workdir.log(**row)
            rows.append(row)
            advance()
        tuned = {
            name: tune(
                cfg,
                (inner, outer, predict),
                (train, val, test),
                theta,
                w_star,
                m,
                solve,
            )
            for name, m in [
                ("neumann", ij.Neumann(cfg.tune_neumann, damping=step)),
                ("cg", ij.CG(rtol=0.0, max_steps=cfg.tune_cg)),
            ]
            if name in cfg.tune_methods
        }
        for name, t in tuned.items():
            for i, v in enumerate(t["curve"]):
                workdir.log(kind="tune", method=name, step=i, val_loss=v)
            advance(cfg.tune_steps * 2 // max(len(tuned), 1))
    grid = decay_grid(cfg, inner, predict, (train, val, test), w0, solve)
    plot(rows, tuned, grid, workdir)
    summary = {
        "parameters": int(w0.size),
        "hyperparameters": int(theta.size),
        "lambda_max": lam,
        "inner_steps": int(sol.num_steps),
        "inner_seconds_first": round(first_seconds, 3),
        "inner_ms": solve_ms,
        "inner_temp_kib": solve_kib,
        "reference_converged": bool(ref.converged),
        "rows": rows,
        "tuned": tuned,
        "grid": grid,
    }
    summary["table"] = table(summary)
    return summary


def tune(cfg, losses, data, theta, w, linear_solver, solve):
    """Adam on θ, one implicit hypergradient a step from the last inner solution:
    the validation curve and the losses and accuracies at the end."""
    inner, outer, predict = losses
    opt = optax.adam(cfg.tune_lr)
    method = bl.Implicit(linear_solver, atol=cfg.atol, max_steps=256)

    @jax.jit
    def step(theta, w, state):
        w = fit(cfg, inner, theta, w).value  # warm-started
        hg = ij.hypergradient(outer, inner, theta, w, method=method, return_info=True)
        theta, state = optax_step(opt, hg.grad, state, theta)
        return theta, hg.w, state, hg.value

    state, curve = optax_init(opt, theta), []
    for _ in range(cfg.tune_steps):
        theta, w, state, value = step(theta, w, state)
        curve.append(float(value))
    w = solve(theta, w).value
    return {"curve": curve, **_scores(predict, w, data)}


def decay_grid(cfg, inner, predict, data, w0, solve):
    """One weight decay for every parameter, each of the grid: the scores of the
    inner solution, and the best by validation loss."""
    rows = []
    for decay in cfg.decay_grid:
        w = solve(jnp.full(w0.shape, float(np.log(decay))), w0).value
        rows.append({"decay": decay, **_scores(predict, w, data)})
    finite = [r for r in rows if np.isfinite(r["val_loss"])]
    best = min(finite, key=lambda r: r["val_loss"]) if finite else None
    return {"rows": rows, "best": best}


def _scores(predict, w, data):
    names = ("train", "val", "test")
    losses, accuracies = _metrics(predict, w, data)
    out = {f"{n}_loss": float(v) for n, v in zip(names, losses)}
    out.update({f"{n}_acc": float(v) for n, v in zip(names, accuracies)})
    return out


@functools.partial(jax.jit, static_argnums=0)
def _metrics(predict, w, data):
    """Cross-entropy and accuracy on each data set, one compiled call."""
    losses = [cross_entropy(predict, w, d) for d in data]
    return losses, [accuracy(predict, w, d) for d in data]


def plot(rows, tuned, grid, workdir):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    for name in dict.fromkeys(r["method"] for r in rows):
        rs = [r for r in rows if r["method"] == name]
        a1.loglog(
            [max(r["hvps"], 1) for r in rs],
            [max(r["rel_err"], 1e-16) for r in rs],
            "o-",
            label=name,
        )
    a1.set(
        xlabel="Hessian-vector products (M-FAC: none; its m at the points)",
        ylabel="relative error of the hypergradient",
        title="at θ₀: the IHVP's budget",
    )
    for name, t in tuned.items():
        a2.plot(
            np.arange(1, len(t["curve"]) + 1),
            t["curve"],
            label=f"per-parameter, {name}",
        )
    a2.axhline(
        grid["best"]["val_loss"] if grid["best"] else np.nan,
        color="k",
        ls="--",
        lw=0.8,
        label="best single decay",
    )
    a2.set(
        xlabel="hyper-step", ylabel="validation cross-entropy", title="tuning θ by Adam"
    )
    for a in (a1, a2):
        a.grid(alpha=0.3, which="both")
        a.legend(fontsize=8)
    workdir.savefig(fig, "hyperparameters_at_scale.png")


def table(summary):
    cells = lambda r: [
        r["method"],
        r["budget"],
        f"{r['rel_err']:.1e}",
        r["hvps"],
        f"{r['temp_kib']:.0f}",
        f"{r['ms']:.1f}",
        f"{r['ms'] / summary['inner_ms']:.2f}",
    ]
    head = ["method", "budget", "rel. error", "HVPs", "temp KiB", "ms", "x inner solve"]
    lines = [markdown_table(head, [cells(r) for r in summary["rows"]]), ""]
    scores = lambda label, t: [
        label,
        f"{t['val_loss']:.4f}",
        f"{t['test_loss']:.4f}",
        f"{t['test_acc']:.3f}",
    ]
    scored = [scores(f"per-parameter ({n})", t) for n, t in summary["tuned"].items()]
    scored += [
        scores(f"single decay {r['decay']:g}", r) for r in summary["grid"]["rows"]
    ]
    lines.append(
        markdown_table(["weight decay", "val CE", "test CE", "test acc"], scored)
    )
    return "\n".join(lines)
