"""Deep Conjugate Direction: a CNN trained as A⁻¹ up to scale, used as the
direction generator of flexible CG on Darcy systems with unseen coefficient
fields; and a learned PCG factor (Li et al. 2023): a network that outputs a
sparse lower-triangular L, M = L Lᵀ; against CG, Jacobi-CG, IC(0)-CG,
geometric and algebraic multigrid, by grid side.

The systems are -∇·(k∇u) = 1 (`iterjax.gallery.Poisson2D`), k = exp(σ g) a
log-normal field (`lognormal_coefficient`, a fresh seed per system).

The network N(r; k) maps two channels, r / rms(r) and the standardised log k,
through `layers` 3 x 3 convolutions (dilations 1, 2, 4, ... and back, so its
receptive field spans the training grid) with GELUs to one channel z. Training
pairs are (x, r = A x), x a smoothed white noise (box widths up to the grid
side: mostly the low frequencies that CG resolves last), each with its own
field, at the training grid side. Two scale-free losses (`loss`):

    residual (the paper's, Kaneda et al. 2023):
        1 - (r·A z)² / (|r|² |A z|²) = min_α |r - α A z|² / |r|²
    energy (the default):
        1 - (r·z)² / ((z·A z)(x·A x)) = min_α |x - α z|²_A / |x|²_A

The energy loss is the fraction of the error's A-norm² that an exact line
search along z leaves, which is what one step of flexible CG does with z; the
residual loss weighs A z, so the high frequencies (measured in a 400-step
trial: 0.67 against the energy loss's 0.13).
In `iterjax.linear.FlexibleCG(memory=2)` the network's z is made A-orthogonal
to the last two directions and taken with an exact line search, so the error's
A-norm never grows and `converged` is the recomputed residual: a poor network
costs steps (up to `max_steps`), never a wrong answer (the untrained
network's row, at the training grid side, shows it; Principled Acceleration
of Iterative Numerical Methods warns that a learned accelerator can otherwise
make a method arbitrarily worse).

The learned factor (`FactorNetwork`, Li, Chen, Du & Matusik 2023, "Learning
Preconditioner for Conjugate Gradient PDE Solvers") reads the operator, not
the residual: the same convolutions (on a grid, message passing over the
stencil's graph with weights per direction) map the dimensionless couplings ρ
of D^{-1/2} A D^{-1/2} to a factor on A's lower pattern, positive diagonal by
construction, so M = L Lᵀ is symmetric positive definite and plain PCG applies
it (two triangular solves a step, `iterjax.linear.GridFactor`). It is trained
with the paper's loss, |L Lᵀ x - A x|² / |A x|² on the same pairs (x, A x):
M close to A where the solutions lie. The network runs once a system (its
time is reported apart, `factor_setup_ms`), not once a step like the direction
generator; IC(0) (`iterjax.linear.IncompleteCholesky`, the same pattern, its
factorisation inside the timed solve) is the classical factor it competes with.

Reported per grid side and solver (mean over `systems` unseen fields, b = 1,
rtol 1e-8): steps, operator products (a network application is not one; its
FLOPs are reported apart), the true relative residual, and the jitted solve's
median time. The paper's claim: iteration counts that do not grow with the
problem size.
"""

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from flax import nnx

import iterjax as ij
from iterjax.experiments.common import training
from iterjax.experiments.common.digits_diffusion import cast
from iterjax.gallery import Poisson2D, lognormal_coefficient, smooth_field
from iterjax.lab.spec import Count, NonNegative, Positive
from iterjax.lab.tables import markdown_table
from iterjax.linear import cholesky

EVAL_SEED = 10_000  # evaluation fields' seeds start here (training: below)
FACTOR = "CG + learned factor"


@dataclasses.dataclass(frozen=True)
class Config:
    train_grid: Count = 31
    eval_grids: tuple[Count, ...] = (31, 63, 127)
    sigma: NonNegative = 1.0  # the fields' log-standard deviation
    width: Count = 4  # their smoothing width, in grid points
    fields: Count = 512  # training fields
    channels: Count = 16
    layers: Count = 7  # odd: dilations 1, 2, 4, ..., 2^(layers // 2), ..., 1
    steps: Count = 2000
    batch: Count = 16
    learning_rate: Positive = 2e-3
    loss: Literal["energy", "residual"] = "energy"
    memory: Count = 2  # FlexibleCG's
    max_steps: Count = 2000  # FlexibleCG's
    systems: Count = 3  # unseen fields per grid side
    rtol: Positive = 1e-8
    repeats: Count = 3
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        if self.layers % 2 == 0:
            raise ValueError(f"`layers` must be odd, got {self.layers}")
        for n in (self.train_grid, *self.eval_grids):
            if (n + 1) & n:
                raise ValueError(
                    f"grid sides must be 2^j - 1 (the multigrid baselines halve "
                    f"them), got {n}"
                )


def dilations(layers):
    half = [2**i for i in range(layers // 2)]
    return [*half, 2 ** (layers // 2), *reversed(half)]


class Convs(nnx.Module):
    """`layers` dilated 3 x 3 convolutions with GELUs between: (n, n, inputs)
    features -> (n, n, outputs); the last layer starts at zero with `zero_last`."""

    def __init__(self, sizes: list[int], rngs: nnx.Rngs, zero_last: bool = False):
        layers = len(sizes) - 1
        self.convs = nnx.List(
            [
                nnx.Conv(a, b, (3, 3), kernel_dilation=d, padding="SAME", rngs=rngs)
                for a, b, d in zip(
                    sizes[:-1], sizes[1:], dilations(layers), strict=True
                )
            ]
        )
        if zero_last:
            last = self.convs[-1]
            last.kernel[...] = jnp.zeros_like(last.kernel[...])

    def __call__(self, h):
        for conv in self.convs[:-1]:
            h = jax.nn.gelu(conv(h))
        return self.convs[-1](h)


def sizes(channels, layers, inputs=2, outputs=1):
    """Channel sizes, input to output, of a `Convs` body."""
    return [inputs] + [channels] * (layers - 1) + [outputs]


class Network(nnx.Module):
    """N(r; k): (n, n) residual and log-coefficient -> (n, n) direction."""

    def __init__(self, channels: int, layers: int, rngs: nnx.Rngs):
        self.body = Convs(sizes(channels, layers), rngs)

    def __call__(self, r, log_k):
        scale = jnp.sqrt(jnp.mean(r**2))
        h = jnp.stack([r / jnp.where(scale > 0, scale, 1), log_k], axis=-1)
        return self.body(h)[..., 0]


class FactorNetwork(nnx.Module):
    """L(A) (Li et al. 2023): the operator's star, made dimensionless (ρ, the
    couplings of D^{-1/2} A D^{-1/2}), -> a lower-triangular factor on A's
    pattern, L = D^{1/2} L̂ with L̂[i, i] = exp(o₀) and L̂[i, i - e_a] =
    ρ_a exp(o_{1+a}) (o the network's output): δ > 0, so M = L Lᵀ is symmetric
    positive definite whatever the weights. The last layer starts at zero:
    L̂ = I + the strictly lower part of D^{-1/2} A D^{-1/2}."""

    def __init__(self, channels: int, layers: int, rngs: nnx.Rngs):
        self.body = Convs(sizes(channels, layers, 2, 3), rngs, zero_last=True)

    def __call__(self, op):
        n = op.k.shape[-1]
        centre, couplings = cholesky.star(op, n, op.k.dtype, 2)
        rho = cholesky.unit_diagonal(centre, couplings)
        o = self.body(jnp.moveaxis(rho, 0, -1))
        root = jnp.sqrt(centre)
        lower = jnp.stack([root * rho[a] * jnp.exp(o[..., 1 + a]) for a in range(2)])
        return ij.linear.GridFactor(root * jnp.exp(o[..., 0]), lower)


def standardise(log_k):
    return (log_k - jnp.mean(log_k)) / (jnp.std(log_k) + 1e-12)


def loss_function(kind):
    """`loss(model, (k, x))`: the batch mean of the `kind` loss (module
    docstring), z normalised first (both losses are scale-free)."""

    def one(model, k, x):
        op = Poisson2D(k)
        r = op(x)
        z = model(r, standardise(jnp.log(k)))
        z = z / jnp.linalg.norm(z)
        az = op(z)
        if kind == "residual":
            return 1 - jnp.vdot(r, az) ** 2 / (jnp.vdot(r, r) * jnp.vdot(az, az))
        return 1 - jnp.vdot(r, z) ** 2 / (jnp.vdot(z, az) * jnp.vdot(x, r))

    def loss(model, batch):
        k, x = batch
        return jnp.mean(jax.vmap(lambda k, x: one(model, k, x))(k, x))

    return loss


def factor_loss(model, batch):
    """Li et al.'s loss, the batch mean of |L Lᵀ x - A x|² / |A x|²: M = L Lᵀ
    close to A on the solutions' distribution (scale-free)."""

    def one(k, x):
        op = Poisson2D(k)
        r = op(x)
        return jnp.sum((model(op)(x) - r) ** 2) / jnp.sum(r**2)

    k, x = batch
    return jnp.mean(jax.vmap(one)(k, x))


def training_data(cfg):
    """A batch sampler of (k, x) over the training fields (r = A x is formed
    in the loss)."""
    n = cfg.train_grid
    fields = np.stack(
        [lognormal_coefficient(n, cfg.sigma, cfg.width, s) for s in range(cfg.fields)]
    ).astype(np.float32)
    widths = [1, 2, 4, 8, 16, n]

    def batches(step):
        rng = np.random.default_rng([cfg.seed, step])
        k = fields[rng.integers(0, cfg.fields, cfg.batch)]
        x = np.stack([smooth_field(n, int(rng.choice(widths)), rng) for _ in k])
        return k, x.astype(np.float32)

    return batches


def network_flops(cfg, n, outputs=1):
    """Multiply-adds x 2 of one network application on an n x n grid (the
    factor network: `outputs=3`)."""
    channels = sizes(cfg.channels, cfg.layers, 2, outputs)
    return 2 * 9 * n * n * sum(a * b for a, b in zip(channels[:-1], channels[1:]))


def _steps(stats, solver, op, b):
    """CG-type steps from the product count: (products - build - one
    application) / (1 + a step's applications); FlexibleCG: products - 1."""
    products = int(stats.num_matvecs)
    if isinstance(solver, ij.linear.FlexibleCG):
        return products - 1
    pre = ij.linear.preconditioners.as_preconditioner(solver.preconditioner)
    if pre is None:
        return products
    _, cost, per = pre.prepared(op).build(op, b)
    return (products - cost - per) // (1 + per)


def solvers(network, untrained):
    """The classical solvers by label, and the networks by label."""
    mg = ij.linear.Multigrid(coarsening="galerkin")
    out = {
        "CG": ij.CG(),
        "Jacobi-CG": ij.CG(preconditioner=ij.linear.JacobiPreconditioner()),
        "IC(0)-CG": ij.CG(preconditioner=ij.linear.IncompleteCholesky()),
        "CG + Galerkin multigrid V(1,1)": ij.CG(preconditioner=mg),
        "CG + SA-AMG": ij.CG(preconditioner=ij.linear.SmoothedAggregation()),
    }
    return out, {"flexible CG + network": network, "flexible CG + untrained": untrained}


def train(cfg, workdir, model, loss, label, batches):
    """`model` fitted in place by Adam on a cosine schedule; its losses."""
    with workdir.progress(cfg.steps, label) as advance:

        def sampled(step):
            advance()
            return batches(step)

        opt = optax.adam(optax.cosine_decay_schedule(cfg.learning_rate, cfg.steps))
        return training.fit(model, loss, cfg.steps, opt, sampled)


def run(cfg: Config, workdir) -> dict:
    batches = training_data(cfg)
    network = Network(cfg.channels, cfg.layers, nnx.Rngs(cfg.seed))
    untrained = cast(Network(cfg.channels, cfg.layers, nnx.Rngs(cfg.seed)), jnp.float64)
    losses = train(cfg, workdir, network, loss_function(cfg.loss), "training", batches)
    factor_net = FactorNetwork(cfg.channels, cfg.layers, nnx.Rngs(cfg.seed))
    factor_losses = train(
        cfg, workdir, factor_net, factor_loss, "training the factor", batches
    )
    for step in range(0, cfg.steps, max(1, cfg.steps // 20)):
        workdir.log(step=step, loss=losses[step], factor_loss=factor_losses[step])
    factor_net = cast(factor_net, jnp.float64)
    build_factor = jax.jit(lambda k: factor_net(Poisson2D(k)))
    factor_ms: dict[int, list[float]] = {}
    network = cast(network, jnp.float64)
    classical, learned = solvers(network, untrained)
    rows = []
    total = len(cfg.eval_grids) * cfg.systems * (len(classical) + len(learned) + 1)
    total -= cfg.systems * sum(n != cfg.train_grid for n in cfg.eval_grids)
    with workdir.progress(total, "solving") as advance:
        for n in cfg.eval_grids:
            per_solver: dict[str, list] = {}
            for s in range(cfg.systems):
                k = jnp.asarray(
                    lognormal_coefficient(n, cfg.sigma, cfg.width, EVAL_SEED + s)
                )
                op, b = Poisson2D(k), jnp.ones((n, n))
                log_k = standardise(jnp.log(k))
                cases = {label: (solver, op) for label, solver in classical.items()}
                factor = build_factor(k)  # the network once a system, then fixed
                timed = ij.diagnostics.time_calls(
                    {"s": (build_factor, (k,))}, cfg.repeats
                )
                factor_ms.setdefault(n, []).append(timed["s"])
                cases[FACTOR] = (
                    ij.CG(preconditioner=lambda r, f=factor: f.solve(r)),
                    op,
                )
                for label, model in learned.items():
                    if model is untrained and n != cfg.train_grid:
                        continue  # (up to max_steps network applications each)
                    generator = lambda r, model=model: model(r, log_k)
                    solver = ij.linear.FlexibleCG(
                        preconditioner=generator,
                        memory=cfg.memory,
                        max_steps=cfg.max_steps,
                    )
                    cases[label] = (solver, op)
                for label, (solver, op) in cases.items():
                    solver = solver.prepared(op)  # an AMG hierarchy: set up here
                    solve = jax.jit(
                        lambda b, solver=solver, op=op: solver.solve_with_stats(
                            op, b, rtol=cfg.rtol
                        )
                    )
                    x, stats = solve(b)
                    error = float(jnp.linalg.norm(b - op(x)) / jnp.linalg.norm(b))
                    timed = ij.diagnostics.time_calls({"s": (solve, (b,))}, cfg.repeats)
                    per_solver.setdefault(label, []).append(
                        (
                            _steps(stats, solver, op, b),
                            int(stats.num_matvecs),
                            error,
                            bool(stats.converged),
                            timed["s"],
                        )
                    )
                    advance()
            for label, results in per_solver.items():
                columns = list(zip(*results, strict=True))
                row = dict(
                    n=n,
                    solver=label,
                    steps=float(np.mean(columns[0])),
                    products=float(np.mean(columns[1])),
                    residual=max(columns[2]),
                    converged=all(columns[3]),
                    ms=float(np.median(columns[4])),
                )
                workdir.log(**row)
                rows.append(row)
    _plot(cfg, {"direction": losses, "factor": factor_losses}, rows, workdir)
    at = lambda n, label: next(r for r in rows if (r["n"], r["solver"]) == (n, label))
    first, last = cfg.eval_grids[0], cfg.eval_grids[-1]
    net = "flexible CG + network"
    tail = max(1, cfg.steps // 20)
    return {
        "rows": rows,
        "final_loss": float(np.mean(losses[-tail:])),
        "final_factor_loss": float(np.mean(factor_losses[-tail:])),
        "network_steps_growth": at(last, net)["steps"] / at(first, net)["steps"],
        "cg_over_network_steps": at(first, "CG")["steps"] / at(first, net)["steps"],
        "factor_steps_growth": at(last, FACTOR)["steps"] / at(first, FACTOR)["steps"],
        "ic_over_factor_steps": {
            n: at(n, "IC(0)-CG")["steps"] / at(n, FACTOR)["steps"]
            for n in cfg.eval_grids
        },
        "network_mflops": {n: network_flops(cfg, n) / 1e6 for n in cfg.eval_grids},
        "factor_mflops": {n: network_flops(cfg, n, 3) / 1e6 for n in cfg.eval_grids},
        "factor_setup_ms": {n: float(np.median(t)) for n, t in factor_ms.items()},
        "table": _table(rows),
    }


def _table(rows):
    head = ["n", "solver", "steps", "products", "rel. residual", "converged", "ms"]
    body = [
        [
            r["n"],
            r["solver"],
            f"{r['steps']:.1f}",
            f"{r['products']:.0f}",
            f"{r['residual']:.1e}",
            r["converged"],
            f"{r['ms']:.2f}",
        ]
        for r in rows
    ]
    return markdown_table(head, body)


def _plot(cfg, losses, rows, workdir):
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
    for label, curve in losses.items():
        left.semilogy(np.arange(len(curve)) + 1, curve, label=label)
    left.legend(fontsize=8)
    left.set(
        title=f"training (direction: {cfg.loss} loss; factor: Li et al.'s)",
        xlabel="step",
        ylabel="loss",
        xscale="log" if cfg.steps > 1 else "linear",
    )
    for label in dict.fromkeys(r["solver"] for r in rows):
        mine = [r for r in rows if r["solver"] == label]
        right.loglog(
            [r["n"] for r in mine], [r["steps"] for r in mine], "o-", label=label
        )
    right.set(
        title=f"steps to rtol {cfg.rtol:g} (unseen fields)",
        xlabel="grid side n",
        ylabel="steps",
    )
    right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.tight_layout()
    workdir.savefig(fig, "learned_preconditioner.png")
