"""iterjax.scan's methods side by side with jax.lax.scan on GRU cells.

One process, same cell, same inputs. For each (hidden, T, batch) case and method:
sweeps to atol 1e-6 (float64; the largest over the batch), parallel depth (sweeps x
depth of one sweep, vs T for lax.scan), wall time of the jitted forward pass (median
and interquartile range over shuffled rounds, `iterjax.diagnostics.timings`) and
of `jax.grad` of a loss through it, as ratios of medians to lax.scan's, and the
compiled temporary memory of both (MB). On a CPU parallel-in-time methods do
T-fold more work in fewer sequential steps: the wall ratios there are > 1 and the
depth is the number to read; on a GPU the depth is what the wall time pays.

Run: make bench   (or: python benchmarks/sequence.py [--quick])
"""

import argparse
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import iterjax as ij  # noqa: E402
from benchmarks._common import compiled_bytes, markdown  # noqa: E402
from iterjax.diagnostics import timings  # noqa: E402
from iterjax.experiments.common import cells  # noqa: E402

ATOL = 1e-6
# (hidden, T, batch)
CASES = [
    (16, 1024, 1),
    (16, 16384, 1),
    (64, 16384, 1),
    (16, 4096, 16),
    (16, 1024, 64),
]
# --large: over 15 min per case on a 2-core CPU
LARGE = [(256, 1024, 1), (256, 4096, 1)]
QUICK = [(16, 1024, 1), (16, 256, 8)]


def methods(hidden, T):
    """The methods of one case; the dense ones slide a window of 1024 once
    T x hidden^2 passes 2^26 for DEER (its Jacobians: 0.5 GB in float64) or 2^24
    for ELK (its filter elements hold three D x D matrices per position, and each
    combine an inverse and seven products)."""
    window = lambda limit: None if hidden * hidden * T <= limit else 1024
    sfx = lambda w: "" if w is None else f"(window={w})"
    deer, elk = window(2**26), window(2**24)
    return {
        "lax.scan": ij.Sequential(),
        "jacobi": ij.Jacobi(),
        "gauss_seidel(8)": ij.GaussSeidel(block=8),
        "quasi_deer": ij.QuasiDEER(),
        "deer" + sfx(deer): ij.DEER(window=deer),
        "elk" + sfx(elk): ij.ELK(window=elk),
        "quasi_elk": ij.QuasiELK(),
    }


def case(hidden, T, batch, rounds, only=None):
    f, init, xs = cells.gru(hidden, T, input_dim=4)
    xs = jnp.broadcast_to(xs, (batch,) + xs.shape) + 0.1 * jax.random.normal(
        jax.random.PRNGKey(1), (batch,) + xs.shape
    )
    rows, fwd, bwd, mem = [], {}, {}, {}
    for name, m in methods(hidden, T).items():
        if only and name != "lax.scan" and name.split("(")[0] not in only:
            continue
        one = lambda xs, m=m: ij.scan(
            f, init, xs, method=m, atol=ATOL, return_stats=True
        )
        forward = jax.jit(jax.vmap(lambda xs, one=one: one(xs)[1]))
        loss = lambda xs, one=one: jnp.sum(jax.vmap(lambda x: one(x)[1])(xs) ** 2)
        backward = jax.jit(jax.grad(loss))
        stats = jax.jit(jax.vmap(lambda xs, one=one: one(xs)[2]))(xs)
        fwd[name], bwd[name] = (forward, (xs,)), (backward, (xs,))
        mem[name] = (compiled_bytes(forward, xs)[0], compiled_bytes(backward, xs)[0])
        sweeps = int(jnp.max(stats.num_sweeps)) if name != "lax.scan" else 0
        depth = T if name == "lax.scan" else sweeps * cells.parallel_depth(m, T)
        rows.append(
            dict(
                method=name,
                sweeps=sweeps,
                depth=depth,
                converged=bool(jnp.all(stats.converged)),
            )
        )
    tf, tb = timings(fwd, rounds), timings(bwd, rounds)
    for r in rows:
        n = r["method"]
        r.update(
            fwd_ms=str(tf[n]),
            fwd_ratio=tf[n].median / tf["lax.scan"].median,
            bwd_ratio=tb[n].median / tb["lax.scan"].median,
            fwd_mem=mem[n][0] / 2**20,
            bwd_mem=mem[n][1] / 2**20,
        )
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small cases")
    parser.add_argument("--large", action="store_true", help="add hidden 256")
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed rounds per call (>= 5: quartiles)"
    )
    parser.add_argument(
        "--methods", help="comma-separated subset, e.g. deer,elk (lax.scan always)"
    )
    parser.add_argument(
        "--cases", help="comma-separated HIDDENxTxBATCH subset, e.g. 16x4096x16"
    )
    args = parser.parse_args(argv)
    print(f"device: {jax.devices()[0].device_kind}, atol {ATOL:g}, float64\n")
    table = []
    cases = QUICK if args.quick else CASES + (LARGE if args.large else [])
    if args.cases:
        cases = [tuple(int(n) for n in c.split("x")) for c in args.cases.split(",")]
    for hidden, T, batch in cases:
        only = args.methods.split(",") if args.methods else None
        for r in case(hidden, T, batch, args.rounds, only):
            table.append(
                [
                    hidden,
                    T,
                    batch,
                    r["method"],
                    r["sweeps"],
                    r["depth"],
                    "yes" if r["converged"] else "NO",
                    r["fwd_ms"],
                    f"{r['fwd_ratio']:.2f}",
                    f"{r['bwd_ratio']:.2f}",
                    f"{r['fwd_mem']:.2f}",
                    f"{r['bwd_mem']:.2f}",
                ]
            )
            print(markdown(HEAD, table[-1:]).splitlines()[-1], flush=True)
    print("\n" + markdown(HEAD, table))


HEAD = [
    "hidden",
    "T",
    "batch",
    "method",
    "sweeps",
    "depth",
    "converged",
    "fwd ms, median [IQR]",
    "fwd / lax.scan",
    "grad / lax.scan",
    "fwd temp MB",
    "grad temp MB",
]

if __name__ == "__main__":
    main()
