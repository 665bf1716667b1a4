"""The memory story of DEQs: a training step with implicit vs unrolled gradients.

A DEQ classifier on a batch of digits runs exactly K forward iterations (atol=0,
max_steps=K) for K = 8 ... 512. For each adjoint, the training step (loss,
gradient, Adam update) is compiled and XLA's memory analysis gives its peak
footprint; the step is also timed. Implicit differentiation never stores the
iterates (one linear solve at z*): flat memory. Unrolled backprop stores every
iterate: memory linear in K (checkpointing trades it for recomputation).

Then, in float64 on a converged model, the gradients of every adjoint against the
implicit gradient with a tight GMRES solve: relative error and cosine, checked by
a central finite difference along a random parameter direction.
"""

import dataclasses
from typing import Annotated, Literal

import jax
import jax.flatten_util
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

from iterjax._optax import optax_init, optax_step  # noqa: E402
from iterjax.diagnostics import compiled_memory, time_calls  # noqa: E402
from iterjax.experiments import deq_models as dm  # noqa: E402
from iterjax.lab.config import Spec  # noqa: E402
from iterjax.lab.spec import Count, Positive  # noqa: E402
from iterjax.lab.tables import markdown_table  # noqa: E402

MIB = 2**20


@dataclasses.dataclass(frozen=True)
class Config:
    hidden: Count = 256
    batch: Count = 128
    iterations: tuple[Count, ...] = (8, 16, 32, 64, 128, 256, 512)
    cell: Literal["contractive", "dense"] = "contractive"
    solver: Annotated[Spec, "solver"] = Spec("picard")
    adjoints: tuple[Annotated[Spec, "adjoint"], ...] = (
        Spec("implicit"),
        Spec("unrolled"),
        Spec("unrolled", (("checkpoint", True),)),
        Spec("phantom", (("steps", 5),)),
    )
    repeats: Count = 5
    grad_batch: Count = 32
    grad_atol: Positive = 1e-11
    seed: int = 0


def _variant(cfg, adjoint):
    return dm.Variant("m", cell=cfg.cell, solver=cfg.solver, adjoint=adjoint)


def training_step(model):
    """A pure (state, opt_state, x, y) -> (state, opt_state, loss) Adam step."""
    graphdef, state = nnx.split(model)
    tx = optax.adam(1e-3)

    def step(state, opt_state, x, y):
        loss = lambda s: dm.cross_entropy(nnx.merge(graphdef, s)(x), y)
        value, grads = jax.value_and_grad(loss)(state)
        return *optax_step(tx, grads, opt_state, state), value

    return step, (state, optax_init(tx, state))


def run(cfg: Config, workdir) -> dict:
    jax.config.update("jax_enable_x64", True)  # float64 for the gradient check only
    xtr, ytr, _, _ = dm.load_digits()
    x, y = jnp.asarray(xtr[: cfg.batch]), jnp.asarray(ytr[: cfg.batch])
    rows = []
    total = len(cfg.adjoints) * len(cfg.iterations)
    with workdir.progress(total, "compiling and timing") as advance:
        for a in cfg.adjoints:
            for K in cfg.iterations:
                train = dm.TrainConfig(hidden=cfg.hidden, atol=0.0, max_steps=K)
                model = dm.make_model(_variant(cfg, a), train)
                step, (state, opt_state) = training_step(model)
                mem = compiled_memory(step, state, opt_state, x, y)
                args = (state, opt_state, x, y)
                ms = time_calls({"s": (jax.jit(step), args)}, cfg.repeats)["s"]
                row = dict(
                    adjoint=a.label,
                    iterations=K,
                    peak_mib=mem["total"] / MIB,
                    temp_mib=mem["temp"] / MIB,
                    ms=ms,
                )
                workdir.log(**row)
                rows.append(row)
                advance()
    growth = {}
    for a in cfg.adjoints:
        peaks = [r["peak_mib"] for r in rows if r["adjoint"] == a.label]
        growth[a.label] = peaks[-1] / peaks[0]
    grads = gradient_agreement(cfg, workdir)
    plot(cfg, rows, workdir)
    return {
        "rows": rows,
        "memory_growth": growth,
        "gradients": grads,
        "table": table(cfg, rows, growth) + "\n\n" + grad_table(grads),
    }


def gradient_agreement(cfg, workdir):
    xtr, ytr, _, _ = dm.load_digits()
    x = jnp.asarray(xtr[: cfg.grad_batch], jnp.float64)
    y = jnp.asarray(ytr[: cfg.grad_batch])
    train = dm.TrainConfig(hidden=cfg.hidden, atol=cfg.grad_atol, max_steps=2000)

    def grad_of(adjoint):
        model = dm.make_model(_variant(cfg, adjoint), train, dtype=jnp.float64)
        graphdef, state = nnx.split(model)
        flat, unravel = jax.flatten_util.ravel_pytree(state)
        loss = lambda p: dm.cross_entropy(nnx.merge(graphdef, unravel(p))(x), y)
        return jax.jit(loss), jax.jit(jax.grad(loss)), flat

    gmres = {"name": "gmres", "rtol": 1e-13, "restart": 50}
    exact = Spec("implicit", (("linear_solver", gmres),))
    loss, grad, flat = grad_of(Spec("implicit"))
    ref = grad_of(exact)[1](flat)
    v = jax.random.normal(jax.random.key(cfg.seed), flat.shape, flat.dtype)
    eps = 1e-5
    fd = (loss(flat + eps * v) - loss(flat - eps * v)) / (2 * eps)
    out = {"finite_difference": {"rel_err": float(abs(ref @ v - fd) / abs(fd))}}
    for a in cfg.adjoints:
        g = grad_of(a)[1](flat)
        row = dict(
            rel_err=float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref)),
            cosine=float(g @ ref / (jnp.linalg.norm(g) * jnp.linalg.norm(ref))),
        )
        workdir.log(kind="gradient", adjoint=a.label, **row)
        out[a.label] = row
    return out


def plot(cfg, rows, workdir):
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    for a in cfg.adjoints:
        rs = [r for r in rows if r["adjoint"] == a.label]
        ks = [r["iterations"] for r in rs]
        a1.loglog(ks, [r["peak_mib"] for r in rs], "o-", label=a.label, base=2)
        a2.loglog(ks, [r["ms"] for r in rs], "o-", label=a.label, base=2)
    a1.set(xlabel="forward iterations K", ylabel="compiled peak memory (MiB)")
    a2.set(xlabel="forward iterations K", ylabel="ms per training step")
    for ax in (a1, a2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"DEQ training step, batch {cfg.batch}, hidden {cfg.hidden}")
    workdir.savefig(fig, "deq_memory.png")


def table(cfg, rows, growth):
    labels = [a.label for a in cfg.adjoints]
    cell = {(r["adjoint"], r["iterations"]): r for r in rows}
    body = [
        [K] + [f"{cell[a, K]['peak_mib']:.1f} / {cell[a, K]['ms']:.1f}" for a in labels]
        for K in cfg.iterations
    ]
    growth_row = [f"growth {cfg.iterations[0]}->{cfg.iterations[-1]}"]
    body.append(growth_row + [f"{growth[a]:.2f}x" for a in labels])
    return markdown_table(["K"] + [f"{a} MiB / ms" for a in labels], body)


def grad_table(grads):
    rows = [
        [k, f"{g['rel_err']:.1e}", f"{g['cosine']:.6f}" if "cosine" in g else "-"]
        for k, g in grads.items()
    ]
    headers = ["gradient", "rel. error vs implicit (GMRES 1e-13)", "cosine"]
    return markdown_table(headers, rows)
