"""The same DEQ trained with iterjax and with torchdeq, side by side.

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

Run: make bench   (or: python benchmarks/deq.py [--epochs N] [--torch PYTHON])
"""

import argparse
import json
import pathlib
import platform
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
from benchmarks._common import markdown  # noqa: E402
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--torch", default=str(ROOT / ".venv-torch" / "bin" / "python"))
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
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
    header = (
        f"DEQ on digits, hidden {s['hidden']}, batch {s['batch']}, {args.epochs} "
        f"epochs x {per_epoch} steps; jax {jax.__version__}, torch "
        f"{theirs['torch']} ({theirs['threads']} threads), {platform.machine()} "
        f"{jax.devices()[0].platform}"
    )
    table = markdown(["metric", "iterjax", "torchdeq", "iterjax / torchdeq"], rows)
    text = header + "\n\n" + table
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"deq_{jax.devices()[0].platform}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
