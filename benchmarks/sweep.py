"""A sweep over seeds of a fixed-point experiment: vectorised vs a Python loop.

The experiment is the built-in `fixed_point_sweep` config without its grid (Anderson on
a 64-dimensional `slow_system`, radius 0.9, atol 1e-8). Measured side by side,
in one process, each the median [interquartile range] of `--repeats`
end-to-end `iterjax run`s (config validation, compile, solves, tables, plots):

* one seed (`sweep: {seeds: 1}`);
* N seeds as one `jax.vmap` (`sweep: {seeds: N}`, the default);
* N seeds as N separate runs (`vmap: false`), which is what a Python loop over
  `iterjax run seed=...` costs, each member compiled for its own constants.

and, without the runner, the compiled solve alone: one seed, N seeds vmapped,
and a Python loop of N calls of the one-seed function (no recompiles). The
vectorised sweep's while loop runs as long as its slowest member; the loop pays
per-call dispatch and N sequential solves.

Run: python benchmarks/sweep.py [--seeds 16] [--repeats 5]
"""

import argparse
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks._common import load, machine, markdown  # noqa: E402
from iterjax.diagnostics import Timing, timings  # noqa: E402
from iterjax.lab import runner as runlib  # noqa: E402

BASE = """\
experiment: fixed_point_sweep
problem: slow_system
dim: 64
radius: 0.9
solver: {name: anderson, history: 5}
atol: 1.0e-8
max_steps: 4000
"""


def end_to_end(tmp, name, sweep, repeats):
    path = pathlib.Path(tmp) / f"{name}.yaml"
    path.write_text(BASE + f"sweep: {sweep}\n")
    times = []
    for _ in range(repeats):
        jax.clear_caches()  # every run compiles, as a fresh `iterjax run` would
        start = time.perf_counter()
        runlib.run_experiment(path, out=tmp, quiet=True)
        times.append(1e3 * (time.perf_counter() - start))
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return Timing(median, q1, q3, None, repeats)


def compiled(seeds, repeats):
    import iterjax.experiments.fixed_point_sweep as fps
    from iterjax.lab.sweep import replace_dotted

    cfg = runlib.prepare("fixed_point_sweep").cfg
    cfg = replace_dotted(replace_dotted(cfg, "radius", 0.9), "solver.history", 5)
    one = jax.jit(lambda s: fps.trial(replace_dotted(cfg, "seed", s)))
    many = jax.jit(jax.vmap(lambda s: fps.trial(replace_dotted(cfg, "seed", s))))
    ids = np.arange(seeds)

    def loop(ids):
        return [one(s) for s in ids]

    calls = {"one": (one, (0,)), "vmap": (many, (ids,)), "loop": (loop, (ids,))}
    return timings(calls, repeats)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    if args.repeats < 2:
        parser.error("--repeats must be >= 2 (for the quartiles)")
    n = args.seeds
    with tempfile.TemporaryDirectory() as tmp:
        e2e = {
            "one seed": end_to_end(tmp, "one", "{seeds: 1}", args.repeats),
            f"{n} seeds, vmapped": end_to_end(
                tmp, "vec", f"{{seeds: {n}}}", args.repeats
            ),
            f"{n} seeds, separate runs": end_to_end(
                tmp, "loop", f"{{seeds: {n}, vmap: false}}", args.repeats
            ),
        }
    ms = compiled(n, max(args.repeats, 10))
    seconds = lambda t: f"{t.median / 1e3:.4g} [{t.q1 / 1e3:.4g}, {t.q3 / 1e3:.4g}]"
    one = e2e["one seed"].median
    rows = [[k, seconds(v), f"{v.median / one:.1f}x"] for k, v in e2e.items()]
    for key, label in (
        ("one", "compiled solve, one seed"),
        ("vmap", f"compiled solve, {n} seeds vmapped"),
        ("loop", f"compiled solve, Python loop of {n}"),
    ):
        rows.append(
            [label, seconds(ms[key]), f"{ms[key].median / ms['one'].median:.1f}x"]
        )
    lines = [
        "# benchmarks/sweep.py, float64",
        "",
        machine(),
        "",
        "fixed_point_sweep: Anderson on slow_system, dim 64, radius 0.9; end to "
        "end = `iterjax run`, compilation included; median [IQR] over "
        f"{args.repeats} runs (compiled solves: {max(args.repeats, 10)} calls)",
        "",
        markdown(["what", "seconds, median [IQR]", "vs one seed"], rows),
        "",
        f"vectorised sweep of {n} seeds / one seed, end to end: "
        f"**{e2e[f'{n} seeds, vmapped'].median / one:.1f}x** (target <= 3x; "
        f"separate runs: {e2e[f'{n} seeds, separate runs'].median / one:.1f}x)",
    ]
    lines += ["", f"Load average (1/5/15 min) at the end: {load()}"]
    print("\n".join(lines))
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"sweep_{jax.devices()[0].platform}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
