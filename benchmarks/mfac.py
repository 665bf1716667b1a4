"""iterjax's M-FAC beside the M-FAC reference implementation, in one run.

The reference (IST-DASLab/M-FAC, Frantar, Kurtic & Alistarh 2021; PyTorch, not on
PyPI: `fetch github:IST-DASLab/M-FAC` and pass its work tree as `--mfac PATH`)
runs in its own venv (`.venv-torch`, torch==2.13.0; `make bench` creates it) as a
subprocess of this script, on the same gradients and right-hand sides (written
to a temporary .npz).

Both compute F⁻¹ x for the damped empirical Fisher F = λ I + (1/m) Gᵀ G of m
gradients (the rows of G, d entries each):
- iterjax `MFAC(G, λ)`: Woodbury with a Cholesky factor of the m x m Gram matrix
  (O(d m² + m³) once, O(d m + m²) a product), jitted; its setup is traced into
  the call, so the first product's time includes it and k products run as one
  `jax.vmap` (the setup is computed once);
- the reference's static algorithm (`prun.HInvFastBatch`, one block): m
  Sherman-Morrison updates in a Python loop (O(d m²) once, O(d m) a product).

Reported: the setup plus one product, the time of each further product
(median over the timed rounds, with its interquartile range; iterjax's from k
right-hand sides under one `jax.vmap`, the reference's one vector a call, as its
`mul` takes them), and the relative
residual ‖F y - x‖ / ‖x‖ of each library's answer, recomputed in float64.
float32, as M-FAC runs. The reference's sliding window (`optim.HInvFastUpMulti`)
factorises without pivoting, which PyTorch implements on CUDA only: it is not
run here (to be measured where a GPU is lent).

Run: make bench MFAC=PATH   (or: python benchmarks/mfac.py --mfac PATH [--quick])
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

import iterjax as ij  # noqa: E402
from benchmarks._common import RESULTS, machine, markdown  # noqa: E402
from iterjax.diagnostics import Timing, timings  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DAMPING = 1e-2

# Run in the torch venv: the reference's static algorithm on the .npz's
# gradients, timed as `timings` times iterjax (a first call apart, then rounds).
REFERENCE = r"""
import json, statistics, sys, time
import numpy as np, torch
sys.path.insert(0, sys.argv[1])
import prun
torch.set_num_threads(2)
data = np.load(sys.argv[2])
G, X = torch.from_numpy(data["G"]), torch.from_numpy(data["X"])
damp, rounds, out = float(data["damp"]), int(data["rounds"]), {}

def timed(f):
    f()
    ts = []
    for _ in range(rounds):
        start = time.perf_counter()
        f()
        ts.append(1e3 * (time.perf_counter() - start))
    return statistics.quantiles(ts, n=4, method="inclusive")

setup_one = lambda: prun.HInvFastBatch(G.clone()[None], damp=damp).mul(X[:1])
hinv = prun.HInvFastBatch(G.clone()[None], damp=damp)
one_more = lambda: hinv.mul(X[1:2])
out["setup_one"], out["product"] = timed(setup_one), timed(one_more)
out["answers"] = torch.cat([hinv.mul(x[None]) for x in X]).double().numpy().tolist()
print(json.dumps(out))
"""


def residual(G, x, y):
    """‖F y - x‖ / ‖x‖ in float64, F = λ I + Gᵀ G / m, matrix-free."""
    G, x, y = (np.asarray(a, np.float64) for a in (G, x, y))
    Fy = DAMPING * y + G.T @ (G @ y) / G.shape[0]
    return float(np.linalg.norm(Fy - x) / np.linalg.norm(x))


def iterjax_rows(G, X, rounds):
    """Setup plus one product, and each further product (from k products)."""
    solve = jax.jit(
        lambda G, X: jax.vmap(lambda x: ij.MFAC(G, DAMPING).solve(lambda v: v, x))(X)
    )
    k = X.shape[0]
    t = timings({"one": (solve, (G, X[:1])), "k": (solve, (G, X))}, rounds)
    answers = np.asarray(solve(G, X))
    # each product past the first: the k-call's time less the one-call's, per product
    return t["one"], (t["k"].median - t["one"].median) / (k - 1), answers


def reference_rows(G, X, rounds, mfac, python):
    with tempfile.TemporaryDirectory() as folder:
        path = pathlib.Path(folder) / "data.npz"
        np.savez(path, G=np.asarray(G), X=np.asarray(X), damp=DAMPING, rounds=rounds)
        proc = subprocess.run(
            [python, "-c", REFERENCE, mfac, str(path)],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise SystemExit(f"the reference failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mfac", required=True, help="IST-DASLab/M-FAC's work tree")
    parser.add_argument("--torch", default=str(ROOT / ".venv-torch" / "bin" / "python"))
    parser.add_argument("--quick", action="store_true", help="d = 10^4, 5 rounds")
    parser.add_argument("--out", default=str(RESULTS / "mfac_cpu.md"))
    args = parser.parse_args()
    d = 10_000 if args.quick else 100_000
    rounds, k = (5, 8) if args.quick else (10, 32)
    rows, ratios = [], []
    for m in (32, 128, 512):
        key_g, key_x = jax.random.split(jax.random.PRNGKey(m))
        G = jax.random.normal(key_g, (m, d), jnp.float32)
        X = jax.random.normal(key_x, (k, d), jnp.float32)
        one, extra, answers = iterjax_rows(G, X, rounds)
        ref = reference_rows(G, X, rounds, args.mfac, args.torch)
        q1, median, q3 = ref["setup_one"]
        ref_one = Timing(median, q1, q3, None, rounds)
        ref_extra = ref["product"][1]
        worst = lambda ys: max(residual(G, x, y) for x, y in zip(X, ys))
        rows += [
            [
                m,
                "iterjax MFAC (Woodbury)",
                str(one),
                f"{extra:.3g}",
                f"{worst(answers):.1e}",
            ],
            [
                m,
                "M-FAC reference (static, HInvFastBatch)",
                str(ref_one),
                f"{ref_extra:.3g}",
                f"{worst(np.asarray(ref['answers'])):.1e}",
            ],
        ]
        ratios.append((m, one.median / median, extra / ref_extra))
    head = [
        "m",
        "library",
        "setup + 1 product, ms",
        "each further product, ms",
        "max residual",
    ]
    lines = [
        f"# benchmarks/mfac.py, float32, d = {d}, λ = {DAMPING:g}, {rounds} timed "
        f"rounds, {k} right-hand sides",
        "",
        machine(),
        "",
        markdown(head, rows),
        "",
        "iterjax / reference time: "
        + ", ".join(
            f"m = {m}: setup + 1 product {a:.2f}x, further products {b:.2f}x"
            for m, a, b in ratios
        ),
        "",
        f"iterjax's further products are its {k} right-hand sides under one "
        "`jax.vmap` (a matrix-matrix product), less the one-product call, per "
        "product; the reference's `mul` takes one vector a call (its API).",
        "The reference's sliding window (optim.HInvFastUpMulti) needs LU without "
        "pivoting, CUDA-only in PyTorch: not run on this CPU.",
    ]
    text = "\n".join(lines) + "\n"
    pathlib.Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
