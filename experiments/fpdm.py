"""Fixed Point Diffusion Models (FPDM), small: a denoiser whose hidden layers are
one implicit fixed-point layer, and sampling that reallocates its iterations.

The denoiser is ε̂(x, t) = W_out z*, z* = tanh(A z* + U [x, features of t] + b),
the cell `iterjax.deq.ContractiveDense` (||A||_∞ <= γ, so z* exists and Picard
reaches it), in an `iterjax.deq.DEQ` layer trained with Jacobian-free backprop
(`PhantomAdjoint(steps=1)`) from `train_iters` Picard iterations, as FPDM trains
with few iterations and a cheap gradient. Beside it, explicit MLP denoisers of
the same width (`experiments.common.digits_diffusion.Denoiser`, depth L).

Reported: parameters, and the compiled memory of one training step; then DDIM
sampling (N steps) where each step may run only k iterations of the fixed-point
layer, an average budget of `budgets` iterations a step:

* `cold`: k iterations from z = 0 at every step;
* `warm`: k iterations from the previous step's z (FPDM's warm start);
* `warm+realloc`: warm, with the budget reallocated: the first step (cold)
  takes `first_share` of it and the rest share the remainder.

Each against sampling with the layer solved to `atol` at every step: the RMS
distance of the samples, and FD-digits / sliced W2 against held-out digits.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import iterjax as ij
from iterjax.experiments.common import digits_diffusion as dd
from iterjax.lab.spec import Count, Fraction, Positive
from iterjax.lab.tables import markdown_table
from iterjax.sequence import samplers

VARIANTS = ("cold", "warm", "warm+realloc")


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: Count = 256
    gamma: Fraction = 0.9  # the cell's contraction bound
    frequencies: Count = 16
    train_iters: Count = 12  # Picard iterations of the layer in training
    train: dd.TrainConfig = dd.TrainConfig()
    explicit_depths: tuple[Count, ...] = (3, 6)
    samples: Count = 128
    steps: Count = 50  # DDIM steps N
    budgets: tuple[Count, ...] = (1, 2, 4, 8)  # average iterations per step
    first_share: Fraction = 0.25  # warm+realloc: the first step's share
    atol: Positive = 1e-6  # the reference: the layer solved at every step
    seed: int = 0
    x64: bool = True


class DEQDenoiser(nnx.Module):
    """ε̂(x, t) through one fixed-point layer; `iterate` exposes the layer."""

    def __init__(self, cfg: Config, rngs: nnx.Rngs, dim: int = 64):
        self.frequencies = cfg.frequencies
        self.cell = ij.deq.ContractiveDense(
            dim + 2 * cfg.frequencies, cfg.hidden, gamma=cfg.gamma, rngs=rngs
        )
        self.deq = ij.deq.DEQ(
            self.cell,
            solver=ij.Picard(),
            adjoint=ij.PhantomAdjoint(steps=1),
            atol=0.0,
            max_steps=cfg.train_iters,
        )
        self.out = nnx.Linear(cfg.hidden, dim, rngs=rngs)

    def __call__(self, x, t):
        """The training forward pass: `train_iters` iterations from z = 0."""
        u = dd.time_features(x, t, self.frequencies)
        z0 = jnp.zeros(u.shape[:-1] + (self.out.in_features,), u.dtype)
        return self.out(self.deq(u, z0))

    def iterate(self, x, t, z, iters):
        """(ε̂, z) after `iters` (traced) iterations of the layer from z."""
        u = dd.time_features(x, t, self.frequencies)
        z = jax.lax.fori_loop(0, iters, lambda _, z: self.cell(z, u), z)
        return self.out(z), z

    def solve(self, x, t, z, atol):
        """(ε̂, z*, steps) with the layer solved to atol from z."""
        u = dd.time_features(x, t, self.frequencies)
        sol = ij.fixed_point(
            lambda z, u: self.cell(z, u),
            z,
            u,
            solver=ij.Picard(),
            atol=atol,
            max_steps=1000,
        )
        return self.out(sol.value), sol.value, sol.num_steps


def count_params(model):
    return sum(a.size for a in jax.tree.leaves(nnx.state(model, nnx.Param)))


def training_memory(model, batch=256):
    """Compiled temporary bytes of one loss-and-gradient step."""
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    x = jnp.zeros((batch, 64), jnp.float32)
    t = jnp.full((batch,), 0.5, jnp.float32)
    loss = lambda p: dd.denoising_loss(nnx.merge(graphdef, p, *rest), (x, t, x))
    compiled = jax.jit(jax.grad(loss)).lower(params).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def allocation(variant, budget, N, first_share):
    """Iterations of the layer at each of the N steps (total budget * N)."""
    if variant != "warm+realloc":
        return np.full(N, budget)
    total = budget * N
    first = max(1, int(round(first_share * total)))
    rest = np.full(N - 1, (total - first) // (N - 1))
    rest[: (total - first) % (N - 1)] += 1
    return np.concatenate([[first], rest])


def sample(model, z_noise, steps, iters, warm, hidden):
    """DDIM with `iters[k]` layer iterations at step k (warm: from the last z)."""

    def step(carry, s):
        x, z = carry
        s_, k = s
        z = z if warm else jnp.zeros_like(z)
        e, z = model.iterate(x, s_.t, z, k)
        return (samplers.ddim_transfer(x, e, s_), z), None

    z0 = jnp.zeros(z_noise.shape[:-1] + (hidden,), z_noise.dtype)
    (x, _), _ = jax.lax.scan(step, (z_noise, z0), (steps, jnp.asarray(iters)))
    return x


def reference(model, z_noise, steps, atol, hidden):
    """DDIM with the layer solved to atol at every step (warm-started)."""

    def step(carry, s):
        x, z, total = carry
        e, z, n = model.solve(x, s.t, z, atol)
        return (samplers.ddim_transfer(x, e, s), z, total + n), None

    z0 = jnp.zeros(z_noise.shape[:-1] + (hidden,), z_noise.dtype)
    (x, _, total), _ = jax.lax.scan(step, (z_noise, z0, jnp.int32(0)), steps)
    return x, total


def run(cfg: Config, workdir) -> dict:
    models = {"fixed point (DEQ)": DEQDenoiser(cfg, nnx.Rngs(cfg.train.seed))}
    for L in cfg.explicit_depths:
        mcfg = dd.ModelConfig(hidden=cfg.hidden, layers=L, frequencies=cfg.frequencies)
        models[f"explicit, {L} layers"] = dd.Denoiser(mcfg, nnx.Rngs(cfg.train.seed))
    sizes = {
        name: dict(
            model=name,
            parameters=count_params(m),
            training_step_mb=training_memory(m) / 2**20,
        )
        for name, m in models.items()
    }
    deq = models["fixed point (DEQ)"]
    with workdir.progress(cfg.train.steps, "training the DEQ denoiser") as advance:
        losses = dd.fit_denoiser(deq, cfg.train)
        advance(cfg.train.steps)
    for k in range(0, len(losses), 100):
        workdir.log("train", step=k + 100, loss=float(np.mean(losses[k : k + 100])))
    classifier, _ = dd.train_classifier(cfg.train)
    model = dd.cast(deq, jnp.float64)
    steps = dd.sampling_steps(cfg.steps)
    z = jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.samples, 64))
    x_ref, total = jax.jit(lambda z: reference(model, z, steps, cfg.atol, cfg.hidden))(
        z
    )
    ref_quality = dd.quality(x_ref, classifier)
    rows, shown = [], {}
    run_budget = jax.jit(
        lambda z, iters, warm: sample(model, z, steps, iters, warm, cfg.hidden),
        static_argnums=2,
    )
    for budget in cfg.budgets:
        for variant in VARIANTS:
            iters = allocation(variant, budget, cfg.steps, cfg.first_share)
            x = run_budget(z, iters, variant != "cold")
            row = dict(
                budget=budget,
                variant=variant,
                iterations=int(iters.sum()),
                rms_to_solved=float(jnp.sqrt(jnp.mean((x - x_ref) ** 2))),
                **dd.quality(x, classifier),
            )
            workdir.log(**row)
            rows.append(row)
            shown[(budget, variant)] = np.asarray(x)
    _plot(cfg, rows, shown, np.asarray(x_ref), workdir)
    return dict(
        sizes=list(sizes.values()),
        final_loss=float(np.mean(losses[-100:])),
        solved=dict(iterations_per_step=int(total) / cfg.steps, **ref_quality),
        rows=rows,
        table=_table(rows),
    )


def _plot(cfg, rows, shown, x_ref, workdir):
    fig, ax = plt.subplots(1, 2, figsize=(13, 4.5))
    for variant in VARIANTS:
        pts = [
            (r["budget"], r["rms_to_solved"]) for r in rows if r["variant"] == variant
        ]
        ax[0].loglog(*np.asarray(pts).T, "o-", label=variant)
    ax[0].set(
        title="distance to sampling with the layer solved",
        xlabel="layer iterations per step (average)",
        ylabel="RMS (pixels in [-1, 1])",
    )
    ax[0].legend(fontsize=8)
    b = cfg.budgets[0]
    images = np.concatenate([x_ref[:8]] + [shown[(b, v)][:8] for v in VARIANTS])
    dd.show(ax[1], images, f"solved; then {', '.join(VARIANTS)} at {b} iteration(s)")
    workdir.savefig(fig, "fpdm.png")


def _table(rows):
    headers = [
        "budget",
        "variant",
        "iterations",
        "RMS to solved",
        "FD-digits",
        "sliced W2",
    ]
    cells = lambda r: [
        r["budget"],
        r["variant"],
        r["iterations"],
        f"{r['rms_to_solved']:.3f}",
        f"{r['fd']:.2f}",
        f"{r['sw']:.3f}",
    ]
    return markdown_table(headers, map(cells, rows))
