r"""Many lower-level problems: blockwise sampling keeps a step's cost flat in m.

m ridge-regression tasks share per-feature log-penalties θ (one w_i per task,
the same θ): g_i(w, θ) = mean ½(X_i w - y_i)² + ½ Σ e^θ w², f_i the task's
validation loss plus ½ ρ |θ|², F(θ) = mean_i f_i(w_i*(θ)), in closed form (each
w_i* one d x d solve), so θ* is known (Newton on F). For m in `tasks`,
`iterjax.bilevel.MultiBlock` takes `blocks` tasks (consecutive in a shuffled
order) and `batch` samples of each per step, with and without its variance
reduction (SAGA tables over blocks), for `steps` steps; the deterministic method
(every task, full batches a step) runs beside it. With `batch` = `samples` the
only noise is which tasks a step sees, the noise the variance reduction removes;
a smaller batch adds noise within each task, which it does not. Reported per
m: the compiled FLOPs of one step, the wall time a step inside the scanned run
(median of 5 runs over `steps`), and |θ - θ*| / |θ*| at the end.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax

from iterjax import bilevel as bl
from iterjax.diagnostics import timings
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    tasks: tuple[Count, ...] = (10, 100, 1000)  # m
    samples: Count = 32  # per task, training and validation each
    features: Count = 5
    blocks: Count = 10  # I, tasks a step
    batch: Count = 32  # samples per sampled task (32: full batches)
    steps: Count = 10000
    outer_lr: Positive = 0.1
    inner_lr: Positive = 0.3
    rho: Positive = 0.1
    seed: int = 0
    x64: bool = True

    def __post_init__(self):  # checked before a run directory exists
        if self.blocks > min(self.tasks):
            raise ValueError(f"`blocks` ({self.blocks}) must be <= every m in `tasks`")
        if self.batch > self.samples:
            raise ValueError(f"`batch` ({self.batch}) must be <= `samples`")


def tasks(cfg, m):
    """(X, y, Xv, yv): m regression tasks around one shared weight vector."""
    keys = jax.random.split(jax.random.PRNGKey(cfg.seed), 5)
    shape = (m, cfg.samples, cfg.features)
    w_true = jax.random.normal(keys[0], (cfg.features,))
    w_tasks = w_true[None, :] + 0.5 * jax.random.normal(keys[1], (m, cfg.features))
    X, Xv = jax.random.normal(keys[2], shape), jax.random.normal(keys[3], shape)
    noise = jax.random.normal(keys[4], (2, m, cfg.samples))
    y = jnp.einsum("mnd,md->mn", X, w_tasks) + noise[0]
    yv = jnp.einsum("mnd,md->mn", Xv, w_tasks) + noise[1]
    return X, y, Xv, yv


def losses(cfg, data):
    X, y, Xv, yv = data

    def inner(w, theta, batch):
        i, idx = batch
        r = X[i, idx] @ w - y[i, idx]
        return 0.5 * jnp.mean(r**2) + 0.5 * jnp.sum(jnp.exp(theta) * w**2)

    def outer(w, theta, batch):
        i, idx = batch
        fit = 0.5 * jnp.mean((Xv[i, idx] @ w - yv[i, idx]) ** 2)
        return fit + 0.5 * cfg.rho * jnp.sum(theta**2)

    def F(theta):
        def task(X, y, Xv, yv):
            A = X.T @ X / len(X) + jnp.diag(jnp.exp(theta))
            w = jnp.linalg.solve(A, X.T @ y / len(X))
            return 0.5 * jnp.mean((Xv @ w - yv) ** 2)

        mean = jnp.mean(jax.vmap(task)(X, y, Xv, yv))
        return mean + 0.5 * cfg.rho * theta @ theta

    return inner, outer, F


def optimum(F, dim):
    """θ* by 30 Newton steps on the closed-form F (one compiled loop)."""
    newton = lambda _, t: t - jnp.linalg.solve(jax.hessian(F)(t), jax.grad(F)(t))
    return jax.jit(lambda: jax.lax.fori_loop(0, 30, newton, jnp.zeros(dim)))()


def runner(cfg, m, inner, outer, blocks, batch, vr):
    """(step, run): one jitted step, and `steps` steps from θ = 0, w = 0."""
    solver = bl.MultiBlock(
        inner,
        outer,
        optax.sgd(cfg.outer_lr),
        inner_lr=cfg.inner_lr,
        num_blocks=m,
        blocks_per_step=blocks,
        variance_reduction=vr,
    )

    # tasks in a shuffled order, I consecutive ones a step (distinct, as the
    # variance reduction requires, and O(I) to draw, where a fresh draw without
    # replacement would cost O(m) a step)
    order = jax.random.permutation(jax.random.PRNGKey(cfg.seed + 1), m)

    def sample(key, k):
        ids = order[(k * blocks + jnp.arange(blocks, dtype=k.dtype)) % m]
        if batch == cfg.samples:  # full batches
            full = jnp.broadcast_to(jnp.arange(cfg.samples), (blocks, batch))
            return ids, full, full
        ki, ko = jax.random.split(key)
        pick = lambda k: jax.random.randint(k, (blocks, batch), 0, cfg.samples)
        return ids, pick(ki), pick(ko)

    def step(state, key):
        ids, inner_idx, outer_idx = sample(key, state.step)
        return solver.step(state, (ids, inner_idx), outer_idx)[0]

    def run(key):
        state = solver.init(jnp.zeros(cfg.features), jnp.zeros(cfg.features))
        body = lambda s, k: (step(s, k), None)
        return jax.lax.scan(body, state, jax.random.split(key, cfg.steps))[0]

    start = solver.init(jnp.zeros(cfg.features), jnp.zeros(cfg.features))
    return jax.jit(step), run, start


def run(cfg: Config, workdir) -> dict:
    rows = []
    methods = {  # name -> (blocks, batch, variance reduction)
        "sampled": (cfg.blocks, cfg.batch, False),
        "sampled + VR": (cfg.blocks, cfg.batch, True),
        "deterministic": (None, cfg.samples, False),
    }
    key = jax.random.PRNGKey(cfg.seed)
    with workdir.progress(len(cfg.tasks) * len(methods), "runs") as advance:
        for m in cfg.tasks:
            inner, outer, F = losses(cfg, tasks(cfg, m))
            star = optimum(F, cfg.features)
            for name, (blocks, batch, vr) in methods.items():
                blocks = blocks or m
                step, run_all, start = runner(cfg, m, inner, outer, blocks, batch, vr)
                # XLA's count of the step's program, before compiling it
                lowered = step.lower(start, key)
                run_all = jax.jit(run_all)  # inside the scan, updates are in place
                timing = timings({"run": (run_all, (key,))}, rounds=5)["run"]
                theta = run_all(key).theta
                row = dict(
                    m=m,
                    method=name,
                    flops=float(lowered.cost_analysis()["flops"]),
                    step_ms=timing.median / cfg.steps,
                    error=float(jnp.linalg.norm(theta - star) / jnp.linalg.norm(star)),
                )
                workdir.log(**row)
                rows.append(row)
                advance()
    _plot(cfg, rows, workdir)
    return dict(
        rows=rows,
        # FLOPs a step at the largest m over the smallest
        sampled_flops_growth=_ratio(rows, "sampled + VR", "flops", cfg.tasks),
        deterministic_flops_growth=_ratio(rows, "deterministic", "flops", cfg.tasks),
        table=_table(rows),
    )


def _ratio(rows, method, key, tasks):
    """`key` at the largest m over `key` at the smallest, for one method."""
    by_m = {r["m"]: r[key] for r in rows if r["method"] == method}
    return by_m[max(tasks)] / by_m[min(tasks)]


def _plot(cfg, rows, workdir):
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        ms = [r["m"] for r in mine]
        axes[0].loglog(ms, [r["step_ms"] for r in mine], "o-", label=method)
        axes[1].loglog(ms, [r["error"] for r in mine], "o-", label=method)
    axes[0].set(xlabel="lower-level problems m", ylabel="ms per step (median)")
    axes[1].set(
        xlabel="lower-level problems m",
        ylabel=f"|θ - θ*| / |θ*| after {cfg.steps} steps",
    )
    axes[0].legend(fontsize=8)
    workdir.savefig(fig, "bilevel_multiblock.png")


def _table(rows):
    headers = ["m", "method", "FLOPs a step", "ms a step", "relative error"]
    cells = lambda r: [
        r["m"],
        r["method"],
        f"{r['flops']:.3g}",
        f"{r['step_ms']:.3f}",
        f"{r['error']:.1e}",
    ]
    return markdown_table(headers, map(cells, rows))
