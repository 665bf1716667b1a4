"""What a lent accelerator is for, in one command: `make bench-device`.

Runs the measurements behind the sequence papers' headline claims on whatever
device JAX finds, in one process, and writes them to
`benchmarks/results/device_<device>.md` (device: `cpu`, `h100`, ...):

1. DEER and Jacobi against `jax.lax.scan` on a GRU (hidden 16, float64, atol
   1e-6) at T = 1024, 4096, 16384: sweeps, parallel depth, forward and gradient
   wall time as ratios to `lax.scan` (`benchmarks/sequence.py`'s `case`);
2. a vmapped sweep of 16 seeds of `fixed_point_sweep`'s solve against one seed
   and a Python loop of 16 (`benchmarks/sweep.py`'s `compiled`);
3. Picard sampling (`picard_diffusion`'s DDIM chain, N = 1000 steps, window
   64, float64) against `lax.scan`: sweeps, evaluations, error, wall ratio;
4. greedy Jacobi decoding (`jacobi_decode`, blocks of 1, 4, 16) of 64 tokens
   for 8 prompts with `charlm`'s transformer, its weights random (the trained
   checkpoint is a run of `charlm_train`): model calls and wall time per
   token, in float32;
5. one training step of `deq_digits`'s DEQ classifier (hidden 64, batch 64,
   Anderson forward, implicit backward; float32): wall time, forward steps.

On a CPU it runs small sizes (T = 256, 1024; 4 seeds; N = 100) and says so:
there the wall ratios of parallel-in-time methods are > 1 and the depth is the
number to read. Meant to finish in <= 8 minutes on one GPU.

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
    head = ["T", "method", "sweeps", "depth", "converged", "fwd ms, median [IQR]"]
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
                    r["fwd_ms"],
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
    ratio = lambda k: f"{t[k].median / t['one'].median:.2f}"
    rows = [[label[k], str(t[k]), ratio(k)] for k in label]
    return markdown(["solve", "ms, median [IQR]", "/ one seed"], rows)


def picard_sampling(N, rounds):
    from iterjax.experiments import picard_diffusion as pd
    from iterjax.lab.spec import Spec

    cfg = pd.Config(repeats=rounds)
    row, _ = pd.measure(cfg, N, Spec("picard", (("window", 64),)))
    head = ["steps", "method", "sweeps", "evaluations", "converged", "max error"]
    head += ["wall / lax.scan"]
    cells = [N, row["method"], row["sweeps"], row["evaluations"]]
    cells += ["yes" if row["converged"] else "NO", f"{row['error']:.1e}"]
    return markdown(head, [[*cells, f"{row['wall_ratio']:.2f}"]])


def jacobi_decoding(num_tokens, rounds):
    from flax import nnx

    from iterjax.diagnostics import timings
    from iterjax.experiments import jacobi_decoding as jd
    from iterjax.experiments.common import charlm

    vocab = 64
    model = charlm.CharLM(vocab, charlm.ModelConfig(), nnx.Rngs(0))
    prompts = jax.random.randint(jax.random.key(1), (8, 16), 0, vocab)
    run = lambda B: jd.decode_all(model, prompts, num_tokens, B)
    reference = run(1)[0]
    calls = {B: (lambda B=B: run(B), ()) for B in (1, 4, 16)}
    t = timings(calls, rounds)
    rows = []
    for B in calls:
        tokens, stats = run(B)
        exact = bool(jax.numpy.all(tokens == reference))
        per_token = [v / num_tokens for v in (t[B].median, t[B].q1, t[B].q3)]
        rows.append(
            [B, f"{float(stats.num_calls.mean()):.1f}", "yes" if exact else "NO"]
            + ["{:.3f} [{:.3f}, {:.3f}]".format(*per_token)]
            + [f"{t[B].median / t[1].median:.2f}"]
        )
    head = ["block", "model calls", "= sequential", "ms / token, median [IQR]"]
    head += ["wall / block 1"]
    return markdown(head, rows)


def deq_step(rounds):
    from iterjax.diagnostics import timings
    from iterjax.experiments.common import deq_models as dm

    cfg = dm.TrainConfig(hidden=64, batch=64)
    x, y, _, _ = dm.load_data(cfg)
    x, y = x[: cfg.batch], y[: cfg.batch]
    model = dm.make_model(dm.Variant("deq"), cfg, in_features=x.shape[1])
    opt = dm.optimizer(model, cfg, total_steps=1000)
    key = jax.random.key(0)
    step = lambda: dm.train_step(model, opt, x, y, key)
    _, stats = step()
    t = timings({"step": (step, ())}, rounds)["step"]
    head = ["model", "batch", "forward steps (mean)", "ms / step, median [IQR]"]
    return markdown(
        head,
        [["DEQ, hidden 64", cfg.batch, f"{float(stats['steps']):.1f}", str(t)]],
    )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="CPU sizes anywhere")
    parser.add_argument(
        "--rounds", type=int, default=5, help="timed calls (>= 5, for the quartiles)"
    )
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args(argv)
    name = device_name()
    small = args.small or name == "cpu"
    lengths, seeds = ((256, 1024), 4) if small else ((1024, 4096, 16384), 16)
    steps, tokens = (100, 32) if small else (1000, 64)
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
        f"## Picard sampling of a DDIM chain ({steps} steps, window 64)",
        "",
        picard_sampling(steps, args.rounds),
        "",
        f"## Greedy Jacobi decoding ({tokens} tokens, 8 prompts, random weights)",
        "",
        jacobi_decoding(tokens, args.rounds),
        "",
        "## A DEQ training step (digits, Anderson + implicit backward)",
        "",
        deq_step(args.rounds),
        "",
        f"Total {time.perf_counter() - start:.0f} s.",
    ]
    out = pathlib.Path(args.out) / f"device_{name}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
