"""Learning SOR's ω across a sequence of linear systems (Learning to Relax).

`systems` screened Poisson problems (-Δ + c) u = 1 on an n x n grid, c drawn
uniformly from [0, `max_shift` · 4/h²]: the larger c, the stronger the diagonal
and the smaller the best ω (Young: ω* = 2 / (1 + sqrt(1 - ρ_J²)), ρ_J =
cos(πh) · (4/h²) / (4/h² + c)). Each system is solved by red-black SOR to an
update of `atol`, with ω from a grid of `arms`, chosen per system by

* the plain bandit (`Exp3`), which sees only the iteration count;
* the contextual bandit (`SquareCB`, ridge regression on Chebyshev features of
  c), which also sees c;

both run inside one `lax.scan` over the systems, vmapped over `seeds`. Their
cumulative iterations are compared with the best fixed ω of the grid in
hindsight, the per-instance best ω of the grid, Young's ω* per instance, and a
uniformly random ω. The seed's claim: the bandit's cost approaches the best
fixed ω's, and the contextual one the per-instance optimum's.
"""

import dataclasses
from typing import Annotated

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from iterjax.gallery import Poisson2D
from iterjax.lab.spec import Count, NonNegative, Positive, Range
from iterjax.lab.tables import markdown_table
from iterjax.linear import SOR, optimal_omega
from iterjax.tuning import Exp3, SquareCB
from iterjax.tuning import bandit as bandits

Omega = Annotated[float, Range(0.0, 2.0, lo_open=True, hi_open=True)]


@dataclasses.dataclass(frozen=True)
class Config:
    grid: Count = 16
    systems: Count = 500
    max_shift: NonNegative = 0.5  # c's upper end, in units of the diagonal 4/h²
    arms: tuple[Omega, ...] = (1.1, 1.3, 1.5, 1.7, 1.9)
    atol: Positive = 1e-8
    max_steps: Count = 2000
    learning_rate: Positive = 30.0  # Exp3's
    exploration: float = 10.0  # SquareCB's
    degree: Count = 4  # SquareCB's Chebyshev features
    seeds: Count = 5
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        if len(self.arms) < 2:
            raise ValueError(f"`arms` needs at least two values, got {self.arms}")


def sor_iterations(cfg):
    """cost(ω, c): red-black SOR's steps on (-Δ + c) u = 1."""
    n = cfg.grid

    def cost(omega, shift):
        op = Poisson2D(jnp.ones((n, n)), shift=shift)
        solver = SOR(omega, atol=cfg.atol, max_steps=cfg.max_steps)
        return solver.solve(op, jnp.ones((n, n))).num_steps.astype(jnp.float64)

    return cost


def young_omega(cfg, shift):
    """ω* for the shifted model problem: ρ_J = cos(πh) · d / (d + c), d = 4/h²."""
    h = 1.0 / (cfg.grid + 1)
    d = 4 / h**2
    return optimal_omega(jnp.cos(jnp.pi * h) * d / (d + shift))


def run(cfg: Config, workdir) -> dict:
    h = 1.0 / (cfg.grid + 1)
    top = cfg.max_shift * 4 / h**2
    rng = np.random.default_rng(cfg.seed)
    shifts = jnp.asarray(rng.uniform(0, top, cfg.systems))
    cost = sor_iterations(cfg)
    arms = jnp.asarray(cfg.arms)
    with workdir.progress(4, "solving") as advance:
        table = jax.jit(jax.vmap(lambda w: jax.vmap(lambda c: cost(w, c))(shifts)))(
            arms
        )  # (K, N): every arm on every system
        table = np.asarray(table)
        advance()
        young = np.asarray(
            jax.jit(jax.vmap(lambda c: cost(young_omega(cfg, c), c)))(shifts)
        )
        advance()
        learners = {
            "exp3 (plain)": Exp3(
                cfg.arms, max_cost=cfg.max_steps / 10, learning_rate=cfg.learning_rate
            ),
            "squarecb (contextual)": SquareCB(
                cfg.arms,
                (0.0, top),
                degree=cfg.degree,
                max_cost=cfg.max_steps / 10,
                exploration=cfg.exploration,
            ),
        }
        keys = jax.random.split(jax.random.PRNGKey(cfg.seed), cfg.seeds)
        played = {}
        for name, learner in learners.items():
            go = lambda k, learner=learner: bandits.run(
                learner, cost, shifts, shifts, k
            )
            chosen, costs, _ = jax.jit(jax.vmap(go))(keys)
            played[name] = (np.asarray(chosen), np.asarray(costs))
            advance()
    random_arm = rng.integers(len(cfg.arms), size=(cfg.seeds, cfg.systems))
    curves = {
        "best fixed ω (hindsight)": np.cumsum(table[np.argmin(table.sum(1))]),
        "per-instance best ω": np.cumsum(table.min(0)),
        "Young's ω* per instance": np.cumsum(young),
        "uniformly random ω": np.cumsum(
            table[random_arm, np.arange(cfg.systems)], axis=1
        ).mean(0),
        **{name: np.cumsum(c, axis=1).mean(0) for name, (_, c) in played.items()},
    }
    best = curves["best fixed ω (hindsight)"]
    rows: list[dict] = []
    for name, curve in curves.items():
        at = min(200, cfg.systems) - 1
        row = dict(
            policy=name,
            total_iterations=float(curve[-1]),
            vs_best_fixed=float(curve[-1] / best[-1]),
            vs_best_fixed_at_200=float(curve[at] / best[at]),
        )
        if name in played:
            per_seed = played[name][1].sum(1) / best[-1]
            row["vs_best_fixed_per_seed"] = [round(float(x), 3) for x in per_seed]
        workdir.log(**row)
        rows.append(row)
    _plot(cfg, curves, played, shifts, table, workdir)
    head = [
        "policy",
        "iterations",
        "vs best fixed ω",
        f"same, after {min(200, cfg.systems)}",
    ]
    body = [
        [
            r["policy"],
            int(r["total_iterations"]),
            f"{r['vs_best_fixed']:.3f}",
            f"{r['vs_best_fixed_at_200']:.3f}",
        ]
        for r in rows
    ]
    best_arm = cfg.arms[int(np.argmin(table.sum(1)))]
    text = markdown_table(head, body) + f"\n\nbest fixed ω of the grid: {best_arm}"
    return {"rows": rows, "best_fixed_omega": best_arm, "table": text}


def _plot(cfg, curves, played, shifts, table, workdir):
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.4))
    best = curves["best fixed ω (hindsight)"]
    t = np.arange(1, cfg.systems + 1)
    for name, curve in curves.items():
        axes[0].plot(t, curve / best, label=name)
    axes[0].set(
        xlabel="systems solved",
        ylabel="cumulative iterations / best fixed ω's",
        title=f"SOR on {cfg.systems} screened Poisson systems ({cfg.seeds} seeds)",
        yscale="log",
    )
    axes[0].legend(fontsize=7)
    arms = np.asarray(cfg.arms)
    axes[1].scatter(
        np.asarray(shifts), arms[np.argmin(table, 0)], s=30, label="per-instance best"
    )
    chosen = played["squarecb (contextual)"][0][0]
    last = slice(cfg.systems // 2, None)
    axes[1].scatter(
        np.asarray(shifts)[last],
        arms[chosen[last]] + 0.02,
        s=6,
        label="SquareCB's choice (second half, seed 0)",
    )
    axes[1].set(
        xlabel="shift c (the context)",
        ylabel="relaxation factor ω",
        title="ω against context",
    )
    axes[1].legend(fontsize=7)
    workdir.savefig(fig, "sor_bandit.png")
