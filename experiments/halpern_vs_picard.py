"""Halpern vs Picard on a nonexpansive finite-sum map, and infeasibility detection.

Part 1. T = (1/n) Σ_i T_i, each T_i(z) = (I + S_i)^{-1}(z - c_i) + c_i the
resolvent of a bilinear game's skew operator S_i = [[0, B_i], [-B_i^T, 0]]: firmly
nonexpansive, and, with B_i = B + noise and B's singular values down to
`sigma_min`, a mean map whose contraction factor is within 3e-3 of 1 (Picard is
slow, and would cycle at sigma_min = 0). Picard, Krasnosel'skii-Mann
(`Relaxed(Picard(), 0.5)`), the textbook Halpern, restarted Halpern (classical
weights), Halpern with the estimated contraction (the default) and VR-Halpern
solve it to `atol` for each n; cost is counted in component calls T_i, reported
in units of n (full-map evaluations). The seed's claim (Variance Reduced Halpern
Iteration): VR-Halpern's saving over Halpern grows with n, like √n.

Part 2. The Douglas-Rachford map of two disjoint balls has no fixed point; its
iterates drift by the infimal displacement v = a* - b*. The error of the
estimates of v after k steps: Picard's normalised iterate (y_k - y_0)/k and its
residual, and Halpern's residual (Accelerated Infeasibility Detection: O(1/k) for
the first and last, O(1/√k) for Picard's residual).
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import iterjax as ij
from iterjax.lab.spec import Count, NonNegative, Positive
from iterjax.lab.tables import markdown_table

SOLVERS = {
    "picard": ij.Picard(),
    "km(0.5)": ij.Relaxed(ij.Picard(), 0.5),
    "halpern (textbook)": ij.Halpern(restart=None, contraction=1.0),
    "halpern (restarted)": ij.Halpern(contraction=1.0),
    "halpern (default)": ij.Halpern(),
    "vr-halpern": ij.VRHalpern(),
}


@dataclasses.dataclass(frozen=True)
class Config:
    terms: tuple[Count, ...] = (10, 100, 1000)
    dim: Count = 10  # the game's B is dim x dim; z has 2 dim entries
    sigma_min: Positive = 0.02
    noise: NonNegative = 0.05
    atol: Positive = 1e-6
    max_steps: Count = 20000
    infeasible_steps: tuple[Count, ...] = (10, 30, 100, 300, 1000, 3000, 10000)
    seed: int = 0
    x64: bool = True


def game(n, dim, sigma_min, noise, seed):
    """(M, c): T_i(z) = M_i (z - c_i) + c_i with M_i = (I + S_i)^{-1}."""
    rng = np.random.default_rng(seed)
    u, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    v, _ = np.linalg.qr(rng.normal(size=(dim, dim)))
    b = u @ np.diag(np.geomspace(1.0, sigma_min, dim)) @ v.T
    ms, cs = [], []
    for _ in range(n):
        bi = b + noise * rng.normal(size=(dim, dim)) / np.sqrt(dim)
        zero = np.zeros((dim, dim))
        s = np.block([[zero, bi], [-bi.T, zero]])
        ms.append(np.linalg.inv(np.eye(2 * dim) + s))
        cs.append(rng.normal(size=2 * dim))
    return jnp.asarray(np.stack(ms)), jnp.asarray(np.stack(cs))


def component(z, a, i):
    m, c = a
    return m[i] @ (z - c[i]) + c[i]


def _solve_game(cfg, n, solver):
    a = game(n, cfg.dim, cfg.sigma_min, cfg.noise, cfg.seed)
    z0 = jnp.zeros(2 * cfg.dim)
    solve = jax.jit(
        lambda a: ij.finite_sum_fixed_point(
            component,
            z0,
            a,
            num_terms=n,
            solver=solver,
            atol=cfg.atol,
            max_steps=cfg.max_steps,
            trace=True,
        )
    )
    sol = solve(a)
    calls = sol.stats.get("component_calls", n * (sol.num_steps + 1))
    return sol, int(calls) / n


def disjoint_balls():
    """The Douglas-Rachford map of balls A (centre 0, radius 1) and B (centre
    (4, 1), radius 1.5), and its infimal displacement v = a* - b*."""
    ca, ra, cb, rb = jnp.array([0.0, 0.0]), 1.0, jnp.array([4.0, 1.0]), 1.5

    def proj(c, r, z):
        return c + (z - c) * jnp.minimum(1.0, r / jnp.linalg.norm(z - c))

    def dr(z, _):
        b = proj(cb, rb, z)
        return z + proj(ca, ra, 2 * b - z) - b

    u = (cb - ca) / jnp.linalg.norm(cb - ca)
    return dr, (ca + ra * u) - (cb - rb * u)


def _infeasible(cfg):
    dr, v = disjoint_balls()
    y0 = jnp.array([1.0, -2.0])
    err = lambda est: float(jnp.linalg.norm(est - v))
    rows = []
    for k in cfg.infeasible_steps:
        solve = lambda s, k=k: ij.fixed_point(dr, y0, solver=s, atol=0.0, max_steps=k)
        picard = solve(ij.Picard())
        halpern = solve(ij.Halpern(restart=None, contraction=1.0))
        restarted = solve(ij.Halpern())
        residual = dr(picard.value, None) - picard.value
        rows.append(
            dict(
                k=k,
                picard_normalised=err(picard.displacement),
                picard_residual=err(residual),
                halpern_residual=err(halpern.displacement),
                restarted_halpern_residual=err(restarted.displacement),
                drifting=bool(picard.drifting) and bool(restarted.drifting),
            )
        )
    return rows, v


def run(cfg: Config, workdir) -> dict:
    rows, traces = [], {}
    with workdir.progress(len(cfg.terms) * len(SOLVERS), "solving") as advance:
        for n in cfg.terms:
            for name, solver in SOLVERS.items():
                sol, calls = _solve_game(cfg, n, solver)
                row = dict(
                    n=n,
                    solver=name,
                    steps=int(sol.num_steps),
                    operator_calls=round(calls, 1),
                    converged=bool(sol.converged),
                    residual=float(sol.residual),
                )
                workdir.log(**row)
                rows.append(row)
                traces[(n, name)] = (
                    np.asarray(sol.trace),
                    calls / (int(sol.num_steps) + 1),
                )
                advance()
    infeasible, v = _infeasible(cfg)
    for r in infeasible:
        workdir.log(**r)
    _plot(cfg, traces, rows, infeasible, workdir)
    savings = _savings(rows)
    table = (
        _table(rows)
        + "\n\nVR-Halpern's saving (operator calls of restarted Halpern / its own):\n"
        + ", ".join(f"n={n}: {s:.2f}x" for n, s in savings.items())
        + f"\n\nInfeasible case, |estimate - v|, v = {np.asarray(v).round(4)}:\n"
        + markdown_table(
            ["k", *list(infeasible[0])[1:]],
            [[r["k"], *[_fmt(x) for x in list(r.values())[1:]]] for r in infeasible],
        )
    )
    return {
        "rows": rows,
        "vr_savings": savings,
        "infeasible": infeasible,
        "table": table,
    }


def _savings(rows):
    calls = {(r["n"], r["solver"]): r["operator_calls"] for r in rows}
    ns = sorted({r["n"] for r in rows})
    return {n: calls[(n, "halpern (restarted)")] / calls[(n, "vr-halpern")] for n in ns}


def _fmt(x):
    return f"{x:.2e}" if isinstance(x, float) else x


def _table(rows):
    head = ["n", "solver", "steps", "operator calls", "converged", "residual"]
    body = [
        [
            r["n"],
            r["solver"],
            r["steps"],
            r["operator_calls"],
            r["converged"],
            f"{r['residual']:.1e}",
        ]
        for r in rows
    ]
    return markdown_table(head, body)


def _plot(cfg, traces, rows, infeasible, workdir):
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    n_max = max(cfg.terms)
    ax = axes[0]
    for i, name in enumerate(SOLVERS):
        trace, per_step = traces[(n_max, name)]
        k = np.arange(1, len(trace) + 1)
        ax.loglog(k * per_step, trace, label=name, lw=1.2, color=f"C{i}")
    ax.axhline(cfg.atol, color="gray", ls=":", lw=0.8)
    ax.set(
        xlabel=f"operator calls = component calls / n (n = {n_max}; VR: mean per step)",
        ylabel="residual |T(z) - z|_inf (VR: estimated)",
        title="nonexpansive bilinear-game resolvent",
    )
    ax.legend(fontsize=7)
    ax = axes[1]
    for i, name in enumerate(SOLVERS):
        pts = [(r["n"], r["operator_calls"]) for r in rows if r["solver"] == name]
        conv = [r["converged"] for r in rows if r["solver"] == name]
        if all(conv):  # the textbook Halpern reaches no point of this plot
            ax.loglog(*zip(*pts), "o-", label=name, ms=4, color=f"C{i}")
    ax.set(
        xlabel="n (components)",
        ylabel=f"operator calls to {cfg.atol:g}",
        title="cost vs number of components",
    )
    ax.legend(fontsize=7)
    ax = axes[2]
    k = np.asarray([r["k"] for r in infeasible], dtype=float)
    for key, style in [
        ("picard_normalised", "o-"),
        ("picard_residual", "s-"),
        ("halpern_residual", "^-"),
        ("restarted_halpern_residual", "v-"),
    ]:
        ax.loglog(k, [r[key] for r in infeasible], style, label=key, ms=4)
    first = infeasible[0]["picard_normalised"]
    ax.loglog(k, first * k[0] / k, "k--", lw=0.8, label="O(1/k)")
    res0 = infeasible[0]["picard_residual"]
    worst = "O(1/√k): Picard residual's worst case"
    ax.loglog(k, res0 * np.sqrt(k[0] / k), "k:", lw=0.8, label=worst)
    ax.set(
        xlabel="steps k",
        ylabel="|estimate of v - v|_2",
        title="infeasible: Douglas-Rachford, disjoint balls",
    )
    ax.legend(fontsize=7)
    workdir.savefig(fig, "halpern_vs_picard.png")
