r"""A bilevel problem whose lower level has constraints: LV-HBA against the known
solution.

Lower level: w*(θ) = argmin_w {½ |w - θ|² : w ≥ b}, so w*(θ) = max(θ, b); upper
level F(w, θ) = ½ |w - c|² + ½ ρ |θ|², in `dim` dimensions with c and b drawn
at random. Per component the hyper-objective φ(θ) = ½ (max(θ, b) - c)² + ½ ρ θ²
is convex on each side of b, so θ* is the better of the two sides' minimisers,
max(b, c/(1 + ρ)) and min(b, 0): a closed form with a mix of active and
inactive constraints.

LV-HBA (`iterjax.bilevel.LVHBA`, the constraint c(w, θ) = b - w, w projected onto
w ≥ b) runs for `steps` steps at each penalty growth p of c_k = (k + 1)^p
(`growths`): the upper objective enters as F/c_k, so p sets how fast the bias
falls. Reported: |θ_k - θ*| and |w_k - w*(θ*)| against k, and the answer a
method that ignores the constraints would give (θ = c/(1 + ρ)).
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

from iterjax import bilevel as bl
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    dim: Count = 50
    rho: Positive = 1.0
    growths: tuple[float, ...] = (0.0, 0.2, 0.4)
    steps: Count = 20000
    lr: Positive = 0.05  # θ's SGD step and w's (α)
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        for p in self.growths:
            if not 0.0 <= p < 0.5:
                raise ValueError(f"`growths` must lie in [0, 0.5), got {p}")


def problem(cfg):
    """(c, b, θ*, w*) of the bounded lower level."""
    kc, kb = jax.random.split(jax.random.PRNGKey(cfg.seed))
    c = jax.random.normal(kc, (cfg.dim,))
    b = jax.random.normal(kb, (cfg.dim,))
    phi = lambda t: 0.5 * (jnp.maximum(t, b) - c) ** 2 + 0.5 * cfg.rho * t**2
    above = jnp.maximum(b, c / (1 + cfg.rho))
    below = jnp.minimum(b, 0.0)
    star = jnp.where(phi(above) <= phi(below), above, below)
    return c, b, star, jnp.maximum(star, b)


def run_lvhba(cfg, c, b, star, w_star, growth):
    """(|θ_k - θ*|, |w_k - w*|) for k = 1..steps."""
    f = lambda w, t, _: 0.5 * jnp.sum((w - t) ** 2)
    F = lambda w, t, _: 0.5 * jnp.sum((w - c) ** 2) + 0.5 * cfg.rho * t @ t
    solver = bl.LVHBA(
        f,
        F,
        optax.sgd(cfg.lr),
        constraint=lambda w, t, _: b - w,
        project=lambda w, t: (jnp.maximum(w, b), t),
        inner_lr=cfg.lr,
        growth=growth,
    )

    def body(state, _):
        state, _ = solver.step(state, None, None)
        errors = (state.theta - star, state.w - w_star)
        return state, tuple(jnp.linalg.norm(e) for e in errors)

    state = solver.init(jnp.zeros(cfg.dim), jnp.maximum(jnp.zeros(cfg.dim), b))
    return jax.lax.scan(body, state, None, length=cfg.steps)[1]


def run(cfg: Config, workdir) -> dict:
    c, b, star, w_star = problem(cfg)
    scale = float(jnp.linalg.norm(star))
    active = int(jnp.sum(w_star == b))
    ignoring = float(jnp.linalg.norm(c / (1 + cfg.rho) - star)) / scale
    rows, curves = [], {}
    with workdir.progress(len(cfg.growths), "LV-HBA runs") as advance:
        for p in cfg.growths:
            run_p = jax.jit(run_lvhba, static_argnums=0)
            theta_err, w_err = map(np.asarray, run_p(cfg, c, b, star, w_star, p))
            curves[p] = theta_err / scale
            marks = {k: float(theta_err[k - 1]) / scale for k in _marks(cfg.steps)}
            row = dict(
                growth=p,
                theta_error=float(theta_err[-1]) / scale,
                w_error=float(w_err[-1]) / scale,
                at={str(k): v for k, v in marks.items()},
            )
            workdir.log(
                growth=p, theta_error=row["theta_error"], w_error=row["w_error"]
            )
            rows.append(row)
            advance()
    _plot(cfg, curves, ignoring, workdir)
    return dict(
        rows=rows,
        active_constraints=active,
        ignoring_constraints=ignoring,
        best_theta_error=float(np.min([r["theta_error"] for r in rows])),
        table=_table(rows, cfg.steps),
    )


def _marks(steps):
    return [k for k in (100, 1000, 10000, steps) if k <= steps]


def _plot(cfg, curves, ignoring, workdir):
    fig, ax = plt.subplots(figsize=(6, 4))
    k = np.arange(1, cfg.steps + 1)
    for p, errors in curves.items():
        ax.loglog(k, errors, label=f"LV-HBA, c_k = (k+1)^{p:g}")
    ax.axhline(ignoring, color="k", ls=":", label="ignoring the constraints")
    ax.set(
        xlabel="step k",
        ylabel="|θ_k - θ*| / |θ*|",
        title=f"a lower level with bounds (dim {cfg.dim})",
    )
    ax.legend(fontsize=8)
    workdir.savefig(fig, "bilevel_constrained.png")


def _table(rows, steps):
    marks = _marks(steps)
    headers = ["growth p"] + [f"rel. error at {k}" for k in marks] + ["w's at the end"]
    cells = lambda r: (
        [f"{r['growth']:g}"]
        + [f"{r['at'][str(k)]:.1e}" for k in marks]
        + [f"{r['w_error']:.1e}"]
    )
    return markdown_table(headers, map(cells, rows))
