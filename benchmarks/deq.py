"""A DEQ layer with iterjax beside the JAX peers, and trained beside torchdeq.

Part 1, JAX peers (`--no-torch` runs only this part): the forward solve and
implicit backward pass of z* = tanh(W z* + x), dimension 256, vmapped over a
batch of 64, d/dW of a linear loss on z*; every library stops at
|f(z) - z|_2 <= 1e-6 per example (or its nearest rule) and differentiates
implicitly with its default linear solver: iterjax (Picard, Anderson, Newton),
optimistix 0.1.0 (fixed-point iteration; Newton root finding), jaxopt 0.8.5
(Anderson(m=5), FixedPointIteration). Reported: f evaluations, the forward and
gradient errors against a dense reference (z* to 1e-14 by Newton, the adjoint by
a dense solve per example), the median time of value-and-grad with its
interquartile range, and the compile time.

Part 2, torchdeq:
Model: z* = tanh(A z* + U x + b) with A = W γ / max(|W|_inf, γ) (iterjax's
`ContractiveDense`; the same math in torch), logits = head(z*), hidden 64, on
sklearn's digits. Both start from the same weights, see the same batches in the
same order, and use Adam with the same learning rate, in float32:

* forward: Anderson with history 6, stopping when every example's
  |cell(z) - z|_2 <= f_tol (torchdeq's 'abs' rule; iterjax `norm=two_norm`);
* backward: implicit differentiation with the adjoint system solved by
  fixed-point iteration to b_tol (torchdeq's `ift=True` with `fixed_point_iter`;
  iterjax `ImplicitAdjoint(Richardson(atol=b_tol))`).

Reported: forward function evaluations per training step (one evaluation = the
cell on the whole batch), median time per training step after warm-up, test
accuracy after the budget, with iterjax / torchdeq ratios. torchdeq runs in its
own venv (`.venv-torch`, torch==2.13.0 torchdeq==0.1.0; `make bench` creates it)
as a subprocess of this script, so one run prints both.

Run: make bench   (or: python benchmarks/deq.py [--epochs N] [--torch PYTHON]
[--no-torch])
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore")

import iterjax as ij  # noqa: E402
from benchmarks._common import (  # noqa: E402
    TIME_COLUMNS,
    load,
    machine,
    markdown,
    time_cells,
)
from iterjax.diagnostics import timings  # noqa: E402
from iterjax.experiments.common import deq_models as dm  # noqa: E402

SETTINGS = dict(
    hidden=64,
    gamma=0.9,
    lr=1e-3,
    batch=64,
    history=6,
    f_tol=1e-4,
    f_max_iter=30,
    b_tol=1e-6,
    b_max_iter=40,
)


LAYER = dict(dim=256, batch=64, gamma=0.9, tol=1e-6, max_steps=500)


def layer_problem(dim, batch, gamma):
    """(W with |W|_2 = γ, so that the layer contracts at rate <= γ; inputs x
    (batch, dim); loss weights c (dim,))."""
    kw, kx, kc = jax.random.split(jax.random.PRNGKey(0), 3)
    w = jax.random.normal(kw, (dim, dim))
    w = gamma * w / jnp.linalg.norm(w, ord=2)
    x = jax.random.normal(kx, (batch, dim))
    return w, x, jax.random.normal(kc, (dim,))


def layer(z, args):
    w, x = args
    return jnp.tanh(w @ z + x)


def layer_reference(w, x, c):
    """z* per example by Newton to 1e-14, and d/dW Σ c·z* by the dense adjoint:
    (I - J)ᵀ λ = c, J = diag(1 - z²) W, dL/dW = Σ (λ ∘ (1 - z²)) zᵀ."""
    n = w.shape[0]

    def one(x):
        z = jnp.zeros(n)
        for _ in range(60):
            d = 1 - jnp.tanh(w @ z + x) ** 2
            z = z - jnp.linalg.solve(jnp.eye(n) - d[:, None] * w, z - layer(z, (w, x)))
        d = 1 - layer(z, (w, x)) ** 2
        lam = jnp.linalg.solve((jnp.eye(n) - d[:, None] * w).T, c)
        return z, jnp.outer(lam * d, z)

    z, g = jax.jit(jax.vmap(one))(x)
    return z, g.sum(0)


def layer_methods(fn, tol, max_steps):
    """name -> solve(w, x) -> z* of `fn` (vmapped over x inside), each
    differentiable by its library's implicit differentiation."""
    import jaxopt
    import optimistix as optx

    def iterjax_solve(solver):
        def solve(w, x):
            one = lambda x: (
                ij.fixed_point(
                    fn,
                    jnp.zeros(w.shape[0]),
                    (w, x),
                    solver=solver,
                    atol=tol,
                    max_steps=max_steps,
                    norm=ij.two_norm,
                ).value
            )
            return jax.vmap(one)(x)

        return solve

    def optimistix_solve(kind):
        def solve(w, x):
            z0 = jnp.zeros(w.shape[0])
            if kind == "fpi":
                s = optx.FixedPointIteration(rtol=0.0, atol=tol, norm=optx.two_norm)
                one = lambda x: (
                    optx.fixed_point(
                        fn, s, z0, (w, x), max_steps=max_steps, throw=False
                    ).value
                )
            else:
                s = optx.Newton(rtol=0.0, atol=tol, norm=optx.two_norm)
                g = lambda z, a: fn(z, a) - z
                one = lambda x: (
                    optx.root_find(
                        g, s, z0, (w, x), max_steps=max_steps, throw=False
                    ).value
                )
            return jax.vmap(one)(x)

        return solve

    def jaxopt_solve(kind):
        kw = dict(fixed_point_fun=fn, maxiter=max_steps, tol=tol, implicit_diff=True)
        s = (
            jaxopt.AndersonAcceleration(history_size=5, **kw)
            if kind == "anderson"
            else jaxopt.FixedPointIteration(**kw)
        )

        def solve(w, x):
            return jax.vmap(lambda x: s.run(jnp.zeros(w.shape[0]), (w, x)).params)(x)

        return solve

    return {
        "iterjax Picard": iterjax_solve(ij.Picard()),
        "iterjax Anderson(m=5)": iterjax_solve(ij.Anderson(history=5)),
        "iterjax Newton-GMRES": iterjax_solve(ij.Newton()),
        "optimistix FixedPointIteration": optimistix_solve("fpi"),
        "optimistix Newton (root_find)": optimistix_solve("newton"),
        "jaxopt FixedPointIteration": jaxopt_solve("fpi"),
        "jaxopt AndersonAcceleration(m=5)": jaxopt_solve("anderson"),
    }


def layer_table(rounds):
    """Part 1: value and gradient of Σ c·z*(W) through each library's solve."""
    p = LAYER
    w, x, c = layer_problem(p["dim"], p["batch"], p["gamma"])
    z_ref, g_ref = layer_reference(w, x, c)
    calls, errors, evals = {}, {}, {}
    for name, solve in layer_methods(layer, p["tol"], p["max_steps"]).items():
        loss = lambda w, solve=solve: jnp.sum(solve(w, x) @ c)
        f = jax.jit(jax.value_and_grad(loss))
        calls[name] = (f, (w,))
        counter = ij.diagnostics.EvalCounter(layer)
        counted = layer_methods(counter.fn, p["tol"], p["max_steps"])[name]
        z = jax.jit(counted)(w, x)
        evals[name] = counter.read()["f"] / p["batch"]
        g = f(w)[1]
        errors[name] = (
            float(jnp.max(jnp.linalg.norm(z - z_ref, axis=1))),
            float(jnp.linalg.norm(g - g_ref) / jnp.linalg.norm(g_ref)),
        )
    t = timings(calls, rounds)
    rows = [
        [k, f"{evals[k]:.1f}", f"{errors[k][0]:.1e}", f"{errors[k][1]:.1e}"]
        + time_cells(t[k])
        for k in calls
    ]
    head = ["method", "f evals / example", "max |z - z*|_2", "rel. grad error"]
    best = lambda mine: min(
        (k for k in calls if k.startswith("iterjax") == mine), key=lambda k: t[k].median
    )
    ours, peer = best(True), best(False)
    summary = (
        f"Fastest iterjax / fastest peer (value and grad): {ours} / {peer} = "
        f"**{t[ours].median / t[peer].median:.2f}x**"
    )
    title = (
        f"## A DEQ layer: z = tanh(W z + x), dim {p['dim']}, vmapped over "
        f"{p['batch']}, value and d/dW, |f(z) - z|_2 <= {p['tol']:g}"
    )
    return "\n\n".join([title, markdown(head + TIME_COLUMNS, rows), summary])


def make_model(s):
    cell = ij.deq.ContractiveDense(64, s["hidden"], gamma=s["gamma"], rngs=nnx.Rngs(0))
    head = nnx.Linear(s["hidden"], dm.CLASSES, rngs=nnx.Rngs(1))
    return dm.DEQClassifier(
        cell,
        head,
        hidden=s["hidden"],
        solver=ij.Anderson(history=s["history"]),
        adjoint=ij.ImplicitAdjoint(
            ij.Richardson(atol=s["b_tol"], max_steps=s["b_max_iter"])
        ),
        atol=s["f_tol"],
        max_steps=s["f_max_iter"],
        norm=ij.two_norm,
    )


def weights(model):
    """The initial weights in torch's layout (Linear weights are (out, in))."""
    cell = model.deq.cell
    return dict(
        w=np.asarray(cell.w[...]),
        u_w=np.asarray(cell.u.kernel[...]).T,
        u_b=np.asarray(cell.u.bias[...]),
        head_w=np.asarray(model.head.kernel[...]).T,
        head_b=np.asarray(model.head.bias[...]),
    )


def train_iterjax(model, data, s):
    opt = nnx.Optimizer(model, optax.adam(s["lr"]), wrt=nnx.Param)

    @nnx.jit
    def step(model, opt, x, y):
        def loss_fn(model):
            z, sol = model.solve(x)
            return dm.cross_entropy(model.head(z), y), sol

        with jax.numpy_dtype_promotion("standard"):
            (loss, sol), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
            opt.update(model, grads)
        # All examples are evaluated on every trip of the vmapped loop.
        return loss, jnp.max(sol.num_steps) + 1

    times, nfe, losses = [], [], []
    for order in data["orders"]:
        for idx in order:
            x, y = jnp.asarray(data["xtr"][idx]), jnp.asarray(data["ytr"][idx])
            start = time.perf_counter()
            loss, n = jax.block_until_ready(step(model, opt, x, y))
            times.append(time.perf_counter() - start)
            nfe.append(int(n))
            losses.append(float(loss))
    acc, _ = dm.evaluate(model, jnp.asarray(data["xte"]), jnp.asarray(data["yte"]))
    return dict(step_seconds=times, forward_nfe=nfe, losses=losses, test_acc=float(acc))


def run_torch(python, data, s, workdir):
    npz, settings, out = (workdir / n for n in ("in.npz", "s.json", "out.json"))
    np.savez(npz, **data)
    settings.write_text(json.dumps(s))
    script = ROOT / "benchmarks" / "deq_torch.py"
    proc = subprocess.run(
        [python, str(script), str(npz), str(settings), str(out)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"torchdeq run failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def summary(r, skip):
    return dict(
        nfe=float(np.mean(r["forward_nfe"])),
        ms=1e3 * float(np.median(r["step_seconds"][skip:])),
        acc=r["test_acc"],
        loss=float(np.mean(r["losses"][-skip:])),
    )


def torch_table(args):
    """Part 2: the same DEQ trained with iterjax and with torchdeq."""
    s = SETTINGS
    xtr, ytr, xte, yte = dm.load_digits()
    per_epoch = len(xtr) // s["batch"]
    rng = np.random.default_rng(0)
    orders = np.stack(
        [
            rng.permutation(len(xtr))[: per_epoch * s["batch"]].reshape(per_epoch, -1)
            for _ in range(args.epochs)
        ]
    )
    model = make_model(s)
    data = dict(xtr=xtr, ytr=ytr, xte=xte, yte=yte, orders=orders, **weights(model))
    with tempfile.TemporaryDirectory() as tmp:
        theirs = run_torch(args.torch, data, s, pathlib.Path(tmp))
    ours = train_iterjax(model, data, s)
    skip = per_epoch  # the first epoch warms up (and compiles, for JAX)
    a, b = summary(ours, skip), summary(theirs, skip)
    rows = [
        ["forward f-evals / step", f"{a['nfe']:.1f}", f"{b['nfe']:.1f}"],
        ["ms / training step (median)", f"{a['ms']:.2f}", f"{b['ms']:.2f}"],
        ["train loss (last epoch)", f"{a['loss']:.3f}", f"{b['loss']:.3f}"],
        ["test accuracy", f"{100 * a['acc']:.1f}%", f"{100 * b['acc']:.1f}%"],
    ]
    ratios = [a["nfe"] / b["nfe"], a["ms"] / b["ms"], a["loss"] / b["loss"], None]
    rows = [r + [f"{q:.2f}" if q else "-"] for r, q in zip(rows, ratios)]
    title = (
        f"## DEQ on digits, trained beside torchdeq: hidden {s['hidden']}, batch "
        f"{s['batch']}, {args.epochs} epochs x {per_epoch} steps; torch "
        f"{theirs['torch']} ({theirs['threads']} threads)"
    )
    table = markdown(["metric", "iterjax", "torchdeq", "iterjax / torchdeq"], rows)
    return title + "\n\n" + table


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--torch", default=str(ROOT / ".venv-torch" / "bin" / "python"))
    parser.add_argument("--no-torch", action="store_true", help="part 1 only")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    parts = ["# benchmarks/deq.py, float64 (part 1) and float32 (part 2)", machine()]
    jax.config.update("jax_enable_x64", True)
    parts.append(layer_table(args.rounds))
    jax.config.update("jax_enable_x64", False)
    if not args.no_torch:
        parts.append(torch_table(args))
    parts.append(f"Load average (1/5/15 min) at the end: {load()}")
    text = "\n\n".join(parts)
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"deq_{jax.devices()[0].platform}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
