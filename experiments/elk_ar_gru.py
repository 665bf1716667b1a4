"""ELK's own setting (Gonzalez et al. 2024, Fig. 4): evaluating an autoregressive
GRU trained on a noisy sine wave, in parallel, at the edge of stability.

The model is the paper's: an affine autoregressive flow whose conditioner is a
GRU (hidden H, its input the embedded previous value e_t = w x_{t-1}, a GELU
readout with a skip connection), trained by maximum likelihood (teacher forcing)
on noisy sine waves. Sampling it is the recurrence

    h_t = GRU(h_{t-1}, e_t),   (μ_t, ℓ_t) = D (gelu(h_t) + e_t) + c,
    x_t = μ_t + softplus(ℓ_t) ε_t,

over the state s_t = (h_t, x_t), driven by fixed noise ε_t. The learned scale
makes the noise's effect depend on the state: the trained oscillator's
linearisations about a wrong trajectory amplify, which is where Newton's sweeps
(DEER) overshoot and the Levenberg-Marquardt step of ELK is meant to help (with a
fixed noise scale, as a plain AR GRU, DEER needs few sweeps and the comparison is
moot). For T in `lengths` and every seed (noise draw): sweeps of DEER,
quasi-DEER, ELK and quasi-ELK in the paper's parameterisation (a fixed
λ = 1/σ² and the Kalman filter's means, `sigmasq`, `smooth=False`), and
quasi-ELK polished by DEER (`polish=DEER()`: its own update test cannot see the
amplification), in float32 at atol 1e-4 as the paper, and each one's error
against sequential sampling; then quasi-ELK over a sweep of σ² at the first
length.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import iterjax as ij
from iterjax.experiments.common import cells
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: Count = 3  # the paper's checkpoint: a GRU with 3 units
    period: Positive = 40.0  # of the sine wave, in steps
    noise: Positive = 0.1  # of the training data
    train_steps: Count = 2000  # Adam steps
    batch: Count = 32
    train_length: Count = 200
    lr: Positive = 3e-3
    lengths: tuple[Count, ...] = (2000, 10000)
    seeds: Count = 5  # noise draws per length
    atol: Positive = 1e-4
    elk_sigmasq: Positive = 1e6  # the paper's values
    # dense ELK costs ~15x DEER a sweep on a CPU and needs many sweeps on this
    # model: it runs only at lengths up to this one
    elk_max_length: Count = 2000
    quasi_elk_sigmasq: Positive = 1e2
    sigmasq_sweep: tuple[Positive, ...] = (1.0, 10.0, 100.0, 1000.0)
    seed: int = 0
    x64: bool = False  # float32, as the paper


def init(key, H):
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k1, (H,)),
        "gru": cells.gru_params(k2, H, H),
        "readout": 0.1 * jax.random.normal(k3, (2, H)),
        "bias": jnp.zeros(2),
    }


def step(p, h, x):
    """One step of the conditioner: the new hidden state, the mean and scale of x_t."""
    e = p["embed"] * x
    h = cells.gru_cell(p["gru"], h, e)
    mu, ell = p["readout"] @ (jax.nn.gelu(h) + e) + p["bias"]
    return h, mu, jax.nn.softplus(ell)


def waves(cfg, key, n, L):
    """n noisy sine waves of L steps with random phases."""
    k1, k2 = jax.random.split(key)
    phase = 2 * jnp.pi * jax.random.uniform(k1, (n, 1))
    t = jnp.arange(L, dtype=phase.dtype)[None]
    clean = jnp.sin(2 * jnp.pi * t / cfg.period + phase)
    return clean + cfg.noise * jax.random.normal(k2, (n, L))


def loss(p, ys):
    """Teacher-forced negative log-likelihood of the next value (up to a constant)."""

    def one(y):
        def body(h, x_prev):
            h, mu, scale = step(p, h, x_prev)
            return h, (mu, scale)

        _, (mu, scale) = jax.lax.scan(body, jnp.zeros(p["embed"].shape), y[:-1])
        return jnp.mean(0.5 * ((y[1:] - mu) / scale) ** 2 + jnp.log(scale))

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
    """The sampling recurrence on s = (h, x), driven by ε_t; float32."""
    p = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)
    H = cfg.hidden

    def f(s, eps):
        h, mu, scale = step(p, s[:H], s[H])
        s = jnp.concatenate([h, (mu + scale * eps)[None]])
        return s, s

    return f, jnp.zeros(H + 1, jnp.float32)


def methods(cfg):
    """name -> (method, the method that polishes its solution, or None)."""
    quasi_elk = ij.QuasiELK(sigmasq=cfg.quasi_elk_sigmasq, smooth=False)
    return {
        "deer": (ij.DEER(), None),
        "quasi_deer": (ij.QuasiDEER(), None),
        "elk": (ij.ELK(sigmasq=cfg.elk_sigmasq, smooth=False), None),
        "quasi_elk": (quasi_elk, None),
        "quasi_elk+deer": (quasi_elk, ij.DEER()),
    }


def solver(cfg, f, s0, method, polish=None):
    """`scan` with `method`, jitted once: every length and noise draw reuses it."""

    def run(eps):
        return ij.scan(
            f, s0, eps, method=method, polish=polish, atol=cfg.atol, return_stats=True
        )

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
    solves = {name: solver(cfg, f, s0, *m) for name, m in methods(cfg).items()}
    rows = []
    sweep_rows = []
    todo = len(cfg.lengths) * cfg.seeds * len(solves)
    todo += cfg.seeds * len(cfg.sigmasq_sweep)
    with workdir.progress(todo, "sweeps") as advance:
        for T in cfg.lengths:
            for seed in range(cfg.seeds):
                for name, solve in solves.items():
                    if name == "elk" and T > cfg.elk_max_length:
                        advance(item=f"T={T} seed={seed} elk skipped")
                        continue
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
    ax[0].plot(curve)
    ax[0].set(
        title="training loss", xlabel="Adam step", ylabel="negative log-likelihood"
    )
    eps = jax.random.normal(jax.random.PRNGKey(1000), (400,), jnp.float32)
    ys = jax.lax.scan(f, s0, eps)[1]
    ax[1].plot(np.asarray(ys[:, -1]))
    ax[1].set(title="a sample of the trained AR GRU", xlabel="t", ylabel="x_t")
    for T in cfg.lengths:
        rows = [r for r in summary if r["length"] == T]
        ax[2].bar(
            [f"{r['method']}\nT={T}" for r in rows],
            [r["sweeps"] for r in rows],
        )
    ax[2].set(title=f"to atol {cfg.atol:g}", ylabel="sweeps (median)", yscale="log")
    ax[2].tick_params(axis="x", labelrotation=90, labelsize=6)
    workdir.savefig(fig, "elk_ar_gru.png")
