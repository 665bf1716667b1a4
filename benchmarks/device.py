"""What a lent accelerator is for, in one command: `make bench-device`.

Runs the measurements behind the sequence papers' headline claims on whatever
device JAX finds, in one process, and writes them to
`benchmarks/results/device_<device>.md` (device: `cpu`, `h100`, ...):

1. DEER and Jacobi against `jax.lax.scan` on a GRU (hidden 16, float64, atol
   1e-6) at T = 1024, 4096, 16384: sweeps, parallel depth, forward and gradient
   wall time as ratios to `lax.scan` (`benchmarks/sequence.py`'s `case`);
2. a vmapped sweep of 16 seeds of `fixed_point_sweep`'s solve against one seed
   and a Python loop of 16 (`benchmarks/sweep.py`'s `compiled`).

On a CPU it runs small sizes (T = 256, 1024; 4 seeds) and says so: there the
wall ratios of parallel-in-time methods are > 1 and the depth is the number to
read. Meant to finish in <= 8 minutes on one GPU. Still to add: Jacobi
decoding, Picard sampling of the diffusion model, a DEQ training step.

Run: make bench-device   (or: python benchmarks/device.py [--small])
"""

import argparse
import pathlib
import re
import sys
import time
import warnings

import jax

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

from benchmarks import sequence as seqbench  # noqa: E402
from benchmarks import sweep as sweepbench  # noqa: E402
from benchmarks._common import markdown  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"


def device_name() -> str:
    """`cpu`, or the accelerator's kind as a file name (`NVIDIA H100 80GB HBM3`
    -> `h100`)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return "cpu"
    kind = device.device_kind.lower().replace("nvidia", "")
    match = re.search(r"[a-z]+\d+[a-z]*", kind)
    return match.group(0) if match else re.sub(r"\W+", "_", kind).strip("_")


def sequences(lengths, rounds):
    head = ["T", "method", "sweeps", "depth", "converged", "fwd ms"]
    head += ["fwd / lax.scan", "grad / lax.scan"]
    rows = []
    for T in lengths:
        for r in seqbench.case(16, T, 1, rounds, only=["jacobi", "deer"]):
            rows.append(
                [
                    T,
                    r["method"],
                    r["sweeps"],
                    r["depth"],
                    "yes" if r["converged"] else "NO",
                ]
                + [
                    f"{r['fwd_ms']:.2f}",
                    f"{r['fwd_ratio']:.2f}",
                    f"{r['bwd_ratio']:.2f}",
                ]
            )
            print(markdown(head, rows[-1:]).splitlines()[-1], flush=True)
    return markdown(head, rows)


def sweep(seeds, repeats):
    t = sweepbench.compiled(seeds, repeats)
    label = {"one": "one seed", "vmap": f"{seeds} seeds, one jax.vmap"}
    label["loop"] = f"{seeds} seeds, a Python loop"
    rows = [[label[k], f"{1e3 * t[k]:.2f}", f"{t[k] / t['one']:.2f}"] for k in label]
    return markdown(["solve", "ms", "/ one seed"], rows)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU sizes anywhere")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    name = device_name()
    small = args.small or name == "cpu"
    lengths, seeds = ((256, 1024), 4) if small else ((1024, 4096, 16384), 16)
    start = time.perf_counter()
    kind = jax.devices()[0].device_kind
    print(f"device: {kind} ({name}){', small sizes' if small else ''}\n", flush=True)
    parts = [
        f"# Device benchmarks on {kind}",
        "",
        f"`python benchmarks/device.py{' --small' if args.small else ''}`; "
        + ("small sizes (a CPU run: read depth, not wall time). " if small else "")
        + "float64.",
        "",
        "## DEER and Jacobi vs lax.scan (GRU, hidden 16, atol 1e-6)",
        "",
        sequences(lengths, args.rounds),
        "",
        f"## A sweep of {seeds} seeds (fixed_point_sweep's solve)",
        "",
        sweep(seeds, args.rounds),
        "",
        f"Total {time.perf_counter() - start:.0f} s.",
    ]
    out = pathlib.Path(args.out) / f"device_{name}.md"
    out.write_text("\n".join(parts) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
