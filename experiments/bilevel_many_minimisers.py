r"""A lower level with a plane of minimisers: V-PBGD's O(1/γ) closeness.

Lower level g(w, θ) = ½ |A w - B θ|², w ∈ R^d, A of rank r < d: its minimisers
form an affine subspace S(θ) of dimension d - r (a plane), so g is PL but not
strongly convex, and argmin_w g is a set. Upper level f(w, θ) = ½ |w - c|² +
½ ρ |θ|², taken at the optimistic selection (the minimiser of f on S(θ)):

    F(θ) = ½ |A⁺(B θ - A c)|² + ½ ρ |θ|²,   θ* = (Bᵀ(AAᵀ)⁻¹B + ρ I)⁻¹ Bᵀ(AAᵀ)⁻¹ A c,

in closed form. Methods, each from the same start, error |θ_k - θ*| against the
outer step k:

* `VPBGD` at penalties γ (`gammas`), double loop (`inner_steps` steps of z and
  y a step) and single loop (one each). The penalised problem's solution is
  O(1/γ) from θ*, computed here in closed form too, so the error's floor is
  known: the run checks that V-PBGD reaches it;
* `hypergradient` with `Implicit(CG())` from a minimiser of g that is not the
  optimistic one (w₀ = the least-norm minimiser, the usual inner solver's
  answer from 0): there ∇_w f leaves range(∇²g), CG's system has no solution,
  and iterjax reports it (not converged; NaN at CG's breakdown) instead of a
  plausible gradient.

Reported: the final error per method and γ, the penalised problem's floor, and
the fitted slope of log(error) against log(1/γ) (the paper: O(σ), σ = 1/γ, so 1).
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax

import iterjax as ij
from iterjax import bilevel as bl
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    dim: Count = 20  # d, the lower level's dimension
    rank: Count = 5  # r < d: the plane of minimisers has dimension d - r
    hyper: Count = 3  # θ's dimension
    rho: Positive = 0.1  # ρ, the upper level's ridge on θ
    gammas: tuple[Positive, ...] = (1.0, 10.0, 100.0, 1000.0)
    steps: Count = 3000  # outer steps
    inner_steps: Count = 10  # the double loop's steps of z and y a step
    outer_lr: Positive = 0.2
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        if self.rank >= self.dim:
            raise ValueError(
                f"`rank` must be < `dim` (a plane of minimisers), got {self.rank}"
            )


def problem(cfg):
    """(A, B, c) with A's rows orthonormal (so that g's step size is 1/|A|² = 1)."""
    ka, kb, kc = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    q, _ = jnp.linalg.qr(jax.random.normal(ka, (cfg.dim, cfg.rank)))
    B = jax.random.normal(kb, (cfg.rank, cfg.hyper)) / jnp.sqrt(cfg.hyper)
    return q.T, B, jax.random.normal(kc, (cfg.dim,))


def losses(A, B, c, rho):
    inner = lambda w, t, _: 0.5 * jnp.sum((A @ w - B @ t) ** 2)
    outer = lambda w, t, _: 0.5 * jnp.sum((w - c) ** 2) + 0.5 * rho * jnp.sum(t**2)
    return inner, outer


def optimum(A, B, c, rho, gamma=None):
    """θ* of the bilevel problem, or (γ given) of V-PBGD's penalised problem.

    The penalised problem min_{θ,y} f + γ (g - v) has y = (I + γAᵀA)⁻¹(c + γAᵀBθ);
    with A's rows orthonormal, A y - Bθ = (Ac - Bθ)/(1 + γ), and its stationary
    θ solves γ/(1 + γ) Bᵀ(Bθ - Ac) + ρθ = 0; γ → ∞ gives θ* (AAᵀ = I)."""
    s = 1.0 if gamma is None else gamma / (1.0 + gamma)
    H = s * B.T @ B + rho * jnp.eye(B.shape[1])
    return jnp.linalg.solve(H, s * B.T @ (A @ c))


def run_vpbgd(cfg, A, B, c, gamma, inner_steps):
    """|θ_k - θ*| for k = 1..steps."""
    inner, outer = losses(A, B, c, cfg.rho)
    solver = bl.VPBGD(
        inner,
        outer,
        optax.sgd(cfg.outer_lr),
        inner_lr=0.5,
        gamma=gamma,
        inner_steps=inner_steps,
        y_steps=inner_steps,
    )
    star = optimum(A, B, c, cfg.rho)

    def body(state, _):
        state, _ = solver.step(state, None, None)
        return state, jnp.linalg.norm(state.theta - star)

    state = solver.init(jnp.zeros(cfg.hyper), jnp.zeros(cfg.dim))
    return jax.lax.scan(body, state, None, length=cfg.steps)[1]


def implicit_at_least_norm(cfg, A, B, c):
    """Implicit CG's hypergradient at θ = 0 from the least-norm minimiser."""
    inner, outer = losses(A, B, c, cfg.rho)
    theta = jnp.zeros(cfg.hyper)
    w0 = jnp.linalg.pinv(A) @ (B @ theta)  # on S(θ), not the optimistic point
    method = bl.Implicit(ij.CG(rtol=1e-10))
    return bl.hypergradient(
        lambda w, t: outer(w, t, None),
        lambda w, t: inner(w, t, None),
        theta,
        w0,
        method=method,
        return_info=True,
    )


def run(cfg: Config, workdir) -> dict:
    A, B, c = problem(cfg)
    star = optimum(A, B, c, cfg.rho)
    rows, curves = [], {}
    loops = {"double": cfg.inner_steps, "single": 1}
    with workdir.progress(len(cfg.gammas) * 2, "V-PBGD runs") as advance:
        for gamma in cfg.gammas:
            floor = float(jnp.linalg.norm(optimum(A, B, c, cfg.rho, gamma) - star))
            for loop, steps in loops.items():
                errors = np.asarray(
                    jax.jit(run_vpbgd, static_argnums=(0, 5))(
                        cfg, A, B, c, gamma, steps
                    )
                )
                curves[(gamma, loop)] = errors
                row = dict(
                    gamma=gamma,
                    loop=loop,
                    error=float(errors[-1]),
                    floor=floor,
                    relative=float(errors[-1]) / float(jnp.linalg.norm(star)),
                )
                workdir.log(**row)
                rows.append(row)
                advance()
    hg = implicit_at_least_norm(cfg, A, B, c)
    implicit = dict(
        grad_finite=bool(jnp.all(jnp.isfinite(hg.grad))),
        converged=bool(hg.converged),
    )
    gammas = np.array([r["gamma"] for r in rows if r["loop"] == "double"])
    errors = np.array([r["error"] for r in rows if r["loop"] == "double"])
    slope = np.polyfit(np.log(1 / gammas), np.log(errors), 1)[0]
    _plot(cfg, curves, workdir)
    return dict(
        rows=rows,
        slope=float(slope),
        implicit_at_least_norm=implicit,
        theta_star_norm=float(jnp.linalg.norm(star)),
        table=_table(rows),
    )


def _plot(cfg, curves, workdir):
    fig, ax = plt.subplots(figsize=(6, 4))
    k = np.arange(1, cfg.steps + 1)
    for i, gamma in enumerate(cfg.gammas):
        for loop, style in (("double", "-"), ("single", ":")):
            label = f"γ = {gamma:g}" if loop == "double" else None
            ax.loglog(k, curves[(gamma, loop)], style, color=f"C{i}", label=label)
    ax.plot([], [], "k-", label="double loop")
    ax.plot([], [], "k:", label="single loop")
    ax.set(
        xlabel="outer step k",
        ylabel="|θ_k - θ*|",
        title="V-PBGD, a plane of minimisers",
    )
    ax.legend(fontsize=8)
    workdir.savefig(fig, "bilevel_many_minimisers.png")


def _table(rows):
    headers = ["γ", "loop", "error to θ*", "closed-form floor", "relative"]
    cells = lambda r: [
        f"{r['gamma']:g}",
        r["loop"],
        f"{r['error']:.2e}",
        f"{r['floor']:.2e}",
        f"{r['relative']:.1e}",
    ]
    return markdown_table(headers, map(cells, rows))
