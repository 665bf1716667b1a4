"""The memory story of DEQs: a training step with implicit vs unrolled gradients.

A DEQ classifier on a batch of digits runs exactly K forward iterations (atol=0,
max_steps=K) for K = 8 ... 512. For each adjoint, the training step (loss,
gradient, Adam update) is compiled and XLA's memory analysis gives its peak
footprint; the step is also timed. Implicit differentiation never stores the
iterates (one linear solve at z*): flat memory. Unrolled backprop stores every
iterate: memory linear in K (checkpointing trades it for recomputation).

Beside them, the DEQ paper's comparison ("88% less memory" than an explicit
network): an explicit network of the same depth K and width, z_{k+1} =
tanh(W_k z_k + U x + b_k) with K untied layers, trained by plain backprop. It
stores its K weight matrices (and their gradients and Adam moments) as well as its
activations, so its memory grows with K where the implicit DEQ's does not.

Then, in float64 on a converged model, the gradients of every adjoint against the
implicit gradient with a tight GMRES solve: relative error and cosine, checked by
a central finite difference along a random parameter direction.
"""

import dataclasses
import functools
from typing import Annotated, Literal

import jax
import jax.flatten_util
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from flax import nnx

from iterjax.diagnostics import compiled_memory, time_calls
from iterjax.experiments.common import deq_models as dm
from iterjax.internal import optax_init, optax_step
from iterjax.lab.config import Spec
from iterjax.lab.spec import Count, Stop
from iterjax.lab.tables import markdown_table

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
    explicit: bool = True  # also the explicit K-layer network
    repeats: Count = 5
    grad_batch: Count = 32
    grad_stop: Stop = Stop(atol=1e-11, max_steps=2000)  # the gradient check's solves
    seed: int = 0
    x64: bool = True  # float64 (set by the lab): the gradient check needs it


def _variant(cfg, adjoint):
    return dm.Variant("m", cell=cfg.cell, solver=cfg.solver, adjoint=adjoint)


class Explicit(nnx.Module):
    """K untied layers z_{k+1} = tanh(W_k z_k + U x + b_k) from z_0 = 0, then a
    linear head: the DEQ's dense cell with its weights untied over depth."""

    def __init__(self, in_features, hidden, depth, *, param_dtype, rngs):
        w = jax.nn.initializers.variance_scaling(0.25, "fan_in", "normal")
        shape = (depth, hidden, hidden)
        self.w = nnx.Param(w(rngs.params(), shape, param_dtype))
        self.b = nnx.Param(jnp.zeros((depth, hidden), param_dtype))
        dense = functools.partial(nnx.Linear, param_dtype=param_dtype, rngs=rngs)
        self.u = dense(in_features, hidden, use_bias=False)
        self.head = dense(hidden, dm.CLASSES)

    def __call__(self, x):
        ux = self.u(x)
        layer = lambda z, wb: (jnp.tanh(z @ wb[0] + ux + wb[1][None]), None)
        z0 = jnp.zeros(ux.shape, ux.dtype)
        z, _ = jax.lax.scan(layer, z0, (self.w[...], self.b[...]))
        return self.head(z)


def _models(cfg, K):
    """(label, model) of every row at depth / forward iterations K."""
    train = dm.TrainConfig(hidden=cfg.hidden, atol=0.0, max_steps=K)
    for a in cfg.adjoints:
        yield a.label, dm.make_model(_variant(cfg, a), train)
    if cfg.explicit:
        kw = dict(param_dtype=jnp.float32, rngs=nnx.Rngs(cfg.seed))
        yield "explicit", Explicit(64, cfg.hidden, K, **kw)


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
    xtr, ytr, _, _ = dm.load_digits()
    x, y = jnp.asarray(xtr[: cfg.batch]), jnp.asarray(ytr[: cfg.batch])
    rows = []
    total = (len(cfg.adjoints) + cfg.explicit) * len(cfg.iterations)
    with workdir.progress(total, "compiling and timing") as advance:
        for K in cfg.iterations:
            for label, model in _models(cfg, K):
                step, (state, opt_state) = training_step(model)
                mem = compiled_memory(step, state, opt_state, x, y)
                args = (state, opt_state, x, y)
                ms = time_calls({"s": (jax.jit(step), args)}, cfg.repeats)["s"]
                row = dict(
                    adjoint=label,
                    iterations=K,
                    params=dm.num_params(model),
                    peak_mib=mem["total"] / MIB,
                    temp_mib=mem["temp"] / MIB,
                    ms=ms,
                )
                workdir.log(**row)
                rows.append(row)
                advance()
    growth = {}
    for label in _labels(cfg):
        peaks = [r["peak_mib"] for r in rows if r["adjoint"] == label]
        growth[label] = peaks[-1] / peaks[0]
    peak = {(r["adjoint"], r["iterations"]): r["peak_mib"] for r in rows}
    # the DEQ paper's measure: the implicit DEQ's memory as a fraction of the
    # explicit network's of the same depth
    vs_explicit = {
        K: peak["implicit", K] / peak["explicit", K]
        for K in cfg.iterations
        if cfg.explicit and ("implicit", K) in peak
    }
    grads = gradient_agreement(cfg, workdir)
    plot(cfg, rows, workdir)
    return {
        "rows": rows,
        "memory_growth": growth,
        "implicit_vs_explicit": vs_explicit,
        "gradients": grads,
        "table": table(cfg, rows, growth, vs_explicit) + "\n\n" + grad_table(grads),
    }


def _labels(cfg):
    return [a.label for a in cfg.adjoints] + ["explicit"] * cfg.explicit


def gradient_agreement(cfg, workdir):
    xtr, ytr, _, _ = dm.load_digits()
    x = jnp.asarray(xtr[: cfg.grad_batch], jnp.float64)
    y = jnp.asarray(ytr[: cfg.grad_batch])
    train = dm.TrainConfig(hidden=cfg.hidden, **cfg.grad_stop.kwargs())

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
    for label in _labels(cfg):
        rs = [r for r in rows if r["adjoint"] == label]
        ks = [r["iterations"] for r in rs]
        a1.loglog(ks, [r["peak_mib"] for r in rs], "o-", label=label, base=2)
        a2.loglog(ks, [r["ms"] for r in rs], "o-", label=label, base=2)
    a1.set(xlabel="forward iterations K (explicit: depth)", ylabel="peak MiB")
    a2.set(xlabel="forward iterations K (explicit: depth)", ylabel="ms per step")
    for ax in (a1, a2):
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"DEQ training step, batch {cfg.batch}, hidden {cfg.hidden}")
    workdir.savefig(fig, "deq_memory.png")


def table(cfg, rows, growth, vs_explicit):
    labels = _labels(cfg)
    cell = {(r["adjoint"], r["iterations"]): r for r in rows}
    body = [
        [K] + [f"{cell[a, K]['peak_mib']:.1f} / {cell[a, K]['ms']:.1f}" for a in labels]
        for K in cfg.iterations
    ]
    growth_row = [f"growth {cfg.iterations[0]}->{cfg.iterations[-1]}"]
    body.append(growth_row + [f"{growth[a]:.2f}x" for a in labels])
    out = markdown_table(["K"] + [f"{a} MiB / ms" for a in labels], body)
    if vs_explicit:
        saved = ", ".join(f"{1 - r:.1%} at K={K}" for K, r in vs_explicit.items())
        out += f"\n\nimplicit DEQ memory saved against the explicit network: {saved}"
    return out


def grad_table(grads):
    rows = [
        [k, f"{g['rel_err']:.1e}", f"{g['cosine']:.6f}" if "cosine" in g else "-"]
        for k, g in grads.items()
    ]
    headers = ["gradient", "rel. error vs implicit (GMRES 1e-13)", "cosine"]
    return markdown_table(headers, rows)
