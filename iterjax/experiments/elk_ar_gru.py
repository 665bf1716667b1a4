"""ELK's own setting (Gonzalez et al. 2024, Fig. 4): evaluating an autoregressive
GRU trained on a noisy sine wave, in parallel, at the edge of stability.

A GRU (hidden H) with a linear readout is trained by teacher forcing to predict
the next value of noisy sine waves. Sampling it is the recurrence

    h_t = GRU(h_{t-1}, y_{t-1}),   y_t = w · h_t + b + σ ε_t,

over the state s_t = (h_t, y_t), driven by fixed noise ε_t: a trained oscillator,
whose Jacobian products neither grow nor decay much, which is where Newton's
sweeps (DEER) overshoot and the Levenberg-Marquardt step of ELK is meant to help.
For T in `lengths` and every seed (noise draw): sweeps of DEER, quasi-DEER, ELK
and quasi-ELK in the paper's parameterisation (a fixed λ = 1/σ² and the Kalman
filter's means, `sigmasq`, `smooth=False`), in float32 at atol 1e-4 as the paper,
and each one's error against sequential sampling; then quasi-ELK over a sweep of
σ² at the first length.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

import iterjax as ij  # noqa: E402
from iterjax.experiments import cells  # noqa: E402
from iterjax.lab.spec import Count, Positive  # noqa: E402
from iterjax.lab.tables import markdown_table  # noqa: E402


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: Count = 8
    period: Positive = 40.0  # of the sine wave, in steps
    noise: Positive = 0.1  # of the training data and of the sampling driver
    train_steps: Count = 1000  # Adam steps
    batch: Count = 32
    train_length: Count = 200
    lr: Positive = 3e-3
    lengths: tuple[Count, ...] = (2000, 10000)
    seeds: Count = 5  # noise draws per length
    atol: Positive = 1e-4
    elk_sigmasq: Positive = 1e6  # the paper's values
    quasi_elk_sigmasq: Positive = 1e2
    sigmasq_sweep: tuple[Positive, ...] = (1.0, 10.0, 100.0, 1000.0)
    seed: int = 0
    x64: bool = False  # float32, as the paper


def init(key, H):
    k1, k2 = jax.random.split(key)
    return {
        "gru": cells.gru_params(k1, H, 1),
        "w": 0.1 * jax.random.normal(k2, (H,)),
        "b": jnp.zeros(()),
    }


def waves(cfg, key, n, L):
    """n noisy sine waves of L steps with random phases."""
    k1, k2 = jax.random.split(key)
    phase = 2 * jnp.pi * jax.random.uniform(k1, (n, 1))
    t = jnp.arange(L, dtype=phase.dtype)[None]
    clean = jnp.sin(2 * jnp.pi * t / cfg.period + phase)
    return clean + cfg.noise * jax.random.normal(k2, (n, L))


def loss(p, ys):
    """Teacher-forced next-value squared error."""

    def one(y):
        def step(h, y_prev):
            h = cells.gru_cell(p["gru"], h, y_prev[None])
            return h, p["w"] @ h + p["b"]

        _, pred = jax.lax.scan(step, jnp.zeros(p["w"].shape), y[:-1])
        return jnp.mean((pred - y[1:]) ** 2)

    return jnp.mean(jax.vmap(one)(ys))


def train(cfg):
    """The AR GRU's parameters and its training loss curve."""
    params = init(jax.random.PRNGKey(cfg.seed), cfg.hidden)
    opt = optax.adam(cfg.lr)

    @jax.jit
    def update(params, state, key):
        ys = waves(cfg, key, cfg.batch, cfg.train_length)
        value, g = jax.value_and_grad(loss)(params, ys)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state, value

    state, key, curve = opt.init(params), jax.random.PRNGKey(cfg.seed + 1), []
    for _ in range(cfg.train_steps):
        key, k = jax.random.split(key)
        params, state, value = update(params, state, k)
        curve.append(float(value))
    return params, curve


def sampler(cfg, params):
    """The sampling recurrence on s = (h, y), driven by ε_t; float32."""
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    H = cfg.hidden

    def f(s, eps):
        h = cells.gru_cell(p["gru"], s[:H], s[H:])
        y = p["w"] @ h + p["b"] + cfg.noise * eps
        s = jnp.concatenate([h, y[None]])
        return s, s

    return f, jnp.zeros(H + 1, jnp.float32)


def methods(cfg):
    return {
        "deer": ij.DEER(),
        "quasi_deer": ij.QuasiDEER(),
        "elk": ij.ELK(sigmasq=cfg.elk_sigmasq, smooth=False),
        "quasi_elk": ij.QuasiELK(sigmasq=cfg.quasi_elk_sigmasq, smooth=False),
    }


def solver(cfg, f, s0, method):
    """`scan` with `method`, jitted once: every length and noise draw reuses it."""
    run = lambda e: ij.scan(f, s0, e, method=method, atol=cfg.atol, return_stats=True)
    return jax.jit(run)


def evaluate(solve, reference, T, seed, name):
    eps = jax.random.normal(jax.random.PRNGKey(1000 + seed), (T,), jnp.float32)
    _, ys, stats = solve(eps)
    return dict(
        length=T,
        seed=seed,
        method=name,
        sweeps=int(stats.num_sweeps),
        converged=bool(stats.converged),
        error=float(jnp.max(jnp.abs(ys - reference(eps)))),
    )


def run(cfg: Config, workdir) -> dict:
    params, curve = train(cfg)
    for step, value in enumerate(curve[:: max(1, len(curve) // 50)]):
        workdir.log("train", step=step, loss=value)
    f, s0 = sampler(cfg, params)
    reference = jax.jit(lambda e: jax.lax.scan(f, s0, e)[1])
    solves = {name: solver(cfg, f, s0, m) for name, m in methods(cfg).items()}
    rows = []
    sweep_rows = []
    todo = len(cfg.lengths) * cfg.seeds * 4 + cfg.seeds * len(cfg.sigmasq_sweep)
    with workdir.progress(todo, "sweeps") as advance:
        for T in cfg.lengths:
            for seed in range(cfg.seeds):
                for name, solve in solves.items():
                    row = evaluate(solve, reference, T, seed, name)
                    workdir.log("runs", **row)
                    rows.append(row)
                    advance(item=f"T={T} seed={seed} {name}")
        T = cfg.lengths[0]
        for sigmasq in cfg.sigmasq_sweep:
            solve = solver(cfg, f, s0, ij.QuasiELK(sigmasq=sigmasq, smooth=False))
            for seed in range(cfg.seeds):
                row = evaluate(solve, reference, T, seed, f"quasi_elk({sigmasq:g})")
                row["sigmasq"] = sigmasq
                workdir.log("sigmasq", **row)
                sweep_rows.append(row)
                advance(item=f"sigmasq={sigmasq:g} seed={seed}")
    summary = _summary(rows + sweep_rows)
    _plot(cfg, curve, summary, f, s0, workdir)
    return {
        "train_loss": curve[-1],
        "rows": rows,
        "sigmasq_rows": sweep_rows,
        "summary": summary,
        "table": _table(summary),
    }


def _summary(rows):
    """Per (length, method): median sweeps, their ratio to DEER's, worst error."""
    out = []
    keys = dict.fromkeys((r["length"], r["method"]) for r in rows)
    for T, m in keys:
        mine = [r for r in rows if (r["length"], r["method"]) == (T, m)]
        deer = [r["sweeps"] for r in rows if (r["length"], r["method"]) == (T, "deer")]
        sweeps = float(np.median([r["sweeps"] for r in mine]))
        out.append(
            dict(
                length=T,
                method=m,
                sweeps=sweeps,
                vs_deer=sweeps / float(np.median(deer)) if deer else float("nan"),
                converged=all(r["converged"] for r in mine),
                max_error=max(r["error"] for r in mine),
            )
        )
    return out


def _table(summary):
    headers = ["T", "method", "sweeps (median)", "vs DEER", "converged", "max error"]
    cell = lambda r: [
        r["length"],
        r["method"],
        f"{r['sweeps']:.0f}",
        f"{r['vs_deer']:.2f}",
        r["converged"],
        f"{r['max_error']:.1e}",
    ]
    return markdown_table(headers, map(cell, summary))


def _plot(cfg, curve, summary, f, s0, workdir):
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].semilogy(curve)
    ax[0].set(title="teacher-forced training loss", xlabel="Adam step")
    eps = jax.random.normal(jax.random.PRNGKey(1000), (400,), jnp.float32)
    ys = jax.lax.scan(f, s0, eps)[1]
    ax[1].plot(np.asarray(ys[:, -1]))
    ax[1].set(title="a sample of the trained AR GRU", xlabel="t")
    for T in cfg.lengths:
        rows = [r for r in summary if r["length"] == T]
        ax[2].bar(
            [f"{r['method']}\nT={T}" for r in rows],
            [r["sweeps"] for r in rows],
        )
    ax[2].set(title=f"median sweeps to atol {cfg.atol:g}", yscale="log")
    ax[2].tick_params(axis="x", labelrotation=90, labelsize=6)
    workdir.savefig(fig, "elk_ar_gru.png")
