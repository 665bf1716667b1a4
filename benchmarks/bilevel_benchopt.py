"""iterjax's stochastic bilevel solvers beside benchopt's bilevel benchmark.

benchopt/benchmark_bilevel (Dagréou, Ablin, Vaiter & Moreau, NeurIPS 2022; run
with benchopt 1.10.0) implements SOBA, SABA, AmIGO and StocBiO in JAX. This
script imports its solver classes from a local checkout (`--benchopt PATH`) and
drives them through their own `run(callback)` loop, beside iterjax's solvers,
on one problem, in one process: `hpo_logreg`'s per-feature L2 penalties of
multinomial logistic regression on sklearn's digits (float64).

Both sides get the same step sizes (hpo_logreg's SOBA ones: benchopt's
`step_size` is iterjax's inner step, its `outer_ratio` the inner over the outer
step), the same batch size and the same outer steps, in blocks of
`eval_freq` steps (one jitted call each). The algorithms differ where the
implementations do: benchopt's SOBA decays both steps as 1/√k (iterjax's are
constant); benchopt draws a fresh minibatch for every inner SGD / Neumann step
(iterjax's AmIGO and StocBiO reuse the step's one inner batch); benchopt walks
through shuffled contiguous batches, iterjax draws random indices.

iterjax's AmIGO and StocBiO also run with a fresh batch for every inner oracle
call (`iterjax.bilevel.Batches`, "fresh batches"), as benchopt and their papers
sample; its SABA also on the problem written as a sum over the batches of a
fixed partition (losses of batch ids: "rows per batch"), where its memory has
benchopt's rows.

Reported per solver and side: the median time of a block, the held-out (test)
cross-entropy after the last block (mean and spread over seeds), and at matched
accuracy (the larger of the two sides' best mean losses) the blocks each needs
to reach it: oracle calls per step are the same algorithm's on both sides, so
the ratio of blocks is the ratio of oracle calls.

Run: make bench-benchopt BENCHOPT=PATH   (PATH: a checkout of
benchopt/benchmark_bilevel; creates .venv-benchopt with iterjax and
benchopt==1.10.0), or .venv-benchopt/bin/python benchmarks/bilevel_benchopt.py
--benchopt PATH.
"""

import argparse
import dataclasses
import importlib.util
import pathlib
import subprocess
import sys
import time

import benchopt
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from benchmarks._common import RESULTS, machine, markdown  # noqa: E402
from iterjax.experiments import hpo_logreg  # noqa: E402
from iterjax.experiments.common import bilevel_runs as runs  # noqa: E402

# One setting for every solver: hpo_logreg's tuned SOBA / SABA steps (outer,
# inner in units of 1/L). Its AmIGO and StocBiO steps (tuned for a budget of
# 1e6 oracle calls) diverge on some seeds over these longer runs, on both sides.
STEPS = dict(outer_lr=1.0, inner_lr=0.5)
SOLVERS = {name: STEPS for name in ("soba", "saba", "amigo", "stocbio")}
INNER_STEPS = 5
NEUMANN_TERMS = 10  # iterjax StocBiO's default; benchopt's n_shia_steps
# iterjax's other ways to run a solver, each a side of its own
FRESH = {"iterjax, fresh batches": {"fresh": True}}
VARIANTS = {
    "amigo": FRESH,
    "stocbio": FRESH,
    "saba": {"iterjax, rows per batch": {"by_batch": True}},
}


def benchopt_solver(path, name, p, lr, batch, eval_freq, seed):
    """benchopt's `Solver` of solvers/<name>.py, its objective set (which
    compiles and warms it up, as benchopt does)."""
    spec = importlib.util.spec_from_file_location(
        f"benchopt_{name}", path / "solvers" / f"{name}.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    step = lr["inner_lr"] / p.L
    params = dict(
        step_size=step,
        outer_ratio=step / lr["outer_lr"],
        batch_size=batch,
        eval_freq=eval_freq,
        random_state=seed,
    )
    if name in ("amigo", "stocbio"):
        params["n_inner_steps"] = INNER_STEPS
    if name == "stocbio":
        params["n_shia_steps"] = NEUMANN_TERMS
    solver = module.Solver.get_instance(**params)
    shape = p.w0.shape
    solver.set_objective(
        sliced(p.inner, p.n, shape),
        sliced(p.outer, p.m, shape),
        p.n,
        p.m,
        p.w0.ravel(),
        p.theta0,
    )
    return solver


def contiguous(start, n, size):
    """The indices of the `size` samples from `start`, the start clamped so
    that they lie in [0, n) (as a dynamic slice clamps it)."""
    return jnp.minimum(start, n - size) + jnp.arange(size)


def sliced(loss, n, shape):
    """benchopt's loss signature, f(inner, outer, start, batch_size), on a flat
    inner variable (its SABA's memory tables assume vectors): the contiguous
    batch from `start` (clamped into the data, as a dynamic slice)."""

    def f(w, theta, start, batch_size):
        return loss(w.reshape(shape), theta, contiguous(start, n, batch_size))

    return f


def run_benchopt(solver, blocks, test, shape):
    """(block seconds, test loss after each block) through the solver's own
    `run(callback)`, whose callback is called before each block."""
    seconds, losses, started = [], [], []

    def callback():
        if started:
            jax.block_until_ready(solver.inner_var)
            seconds.append(time.perf_counter() - started.pop())
            losses.append(float(test(solver.inner_var.reshape(shape))[0]))
        started.append(time.perf_counter())
        return len(losses) < blocks

    solver.run(callback)
    return seconds, losses


def over_batches(p, batch):
    """`p` as a finite sum over the minibatches of a fixed partition of each
    set (contiguous, the last one clamped into the data, as `sliced` reads
    benchopt's): its losses take batch ids. SABA's memory then has a row a
    batch, as benchopt's."""

    def lift(loss, n):
        def f(w, theta, ids):
            return loss(w, theta, contiguous(ids[:, None] * batch, n, batch).ravel())

        return f

    count = lambda n: -(-n // batch)
    return p._replace(
        inner=lift(p.inner, p.n),
        outer=lift(p.outer, p.m),
        n=count(p.n),
        m=count(p.m),
    )


def run_iterjax(
    name, p, lr, batch, eval_freq, blocks, seed, fresh=False, by_batch=False
):
    """The same through iterjax's solver: `eval_freq` steps a jitted block
    (`fresh`: a fresh inner batch for every inner oracle call, `Batches`;
    `by_batch`: the sums over batches of a fixed partition, one id a step)."""
    if by_batch:
        p, batch = over_batches(p, batch), 1
    inner_lr = lr["inner_lr"] / p.L
    s = runs.Solver(name, outer_lr=lr["outer_lr"], inner_lr=inner_lr)
    s = dataclasses.replace(s, inner_steps=INNER_STEPS, fresh_batches=fresh)
    solver = runs.make_solver(s, p.inner, p.outer, p.n, p.m)
    step = runs.random_step(solver, p.n, p.m, batch, fresh)

    def block(state, key):
        body = lambda state, k: (step(state, k)[0], None)
        return jax.lax.scan(body, state, jax.random.split(key, eval_freq))[0]

    state = solver.init(p.theta0, p.w0)
    key = jax.random.PRNGKey(seed)
    block = jax.jit(block).lower(state, key).compile()
    seconds, losses = [], []
    for _ in range(blocks):
        key, sub = jax.random.split(key)
        start = time.perf_counter()
        state = jax.block_until_ready(block(state, sub))
        seconds.append(time.perf_counter() - start)
        losses.append(float(p.test(state.w)[0]))
    return seconds, losses


def checkout_commit(path):
    """The checkout's commit, or "unknown" (not a git checkout)."""
    out = subprocess.run(
        ["git", "-C", str(path), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() or "unknown"


def blocks_to(curve, target):
    """The first block (1-based) whose mean loss is <= target, else None."""
    hits = np.nonzero(curve <= target * (1 + 1e-9))[0]
    return int(hits[0]) + 1 if hits.size else None


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--benchopt", required=True, type=pathlib.Path)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--eval-freq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    sys.path.insert(0, str(args.benchopt.resolve()))  # its benchmark_utils
    p = hpo_logreg.problem("digits", hpo_logreg.Config())
    head = [
        "solver",
        "side",
        "ms a block, median",
        "test loss after the last block, mean ± sd (diverged seeds)",
        "blocks to matched loss",
    ]
    rows, ratios = [], []
    for name, lr in SOLVERS.items():
        curves, times = {}, {}
        sides = {"iterjax": {}, **VARIANTS.get(name, {}), "benchopt": None}
        for side, options in sides.items():
            losses, seconds = [], []
            for seed in range(args.seeds):
                if options is not None:
                    t, loss = run_iterjax(
                        name,
                        p,
                        lr,
                        args.batch,
                        args.eval_freq,
                        args.blocks,
                        seed,
                        **options,
                    )
                else:
                    solver = benchopt_solver(
                        args.benchopt, name, p, lr, args.batch, args.eval_freq, seed
                    )
                    t, loss = run_benchopt(solver, args.blocks, p.test, p.w0.shape)
                losses.append(loss)
                seconds += t
            curves[side] = np.asarray(losses)
            times[side] = 1e3 * float(np.median(seconds))
        # matched accuracy: the larger best mean loss (a diverged side's NaN
        # curve reaches nothing)
        best = [np.nanmin(c.mean(0)) for c in curves.values() if np.isfinite(c).any()]
        target = max(best) if best else np.nan
        reach = {side: blocks_to(c.mean(0), target) for side, c in curves.items()}
        for side, c in curves.items():
            last = c[:, -1]
            rows.append(
                [
                    name,
                    side,
                    f"{times[side]:.2f}",
                    f"{last.mean():.4f} ± {last.std():.4f} "
                    f"({int(np.sum(~np.isfinite(last)))})",
                    f"{reach[side]} (loss {target:.4f})",
                ]
            )
        for side in list(sides)[:-1]:
            ratio = times[side] / times["benchopt"]
            line = f"{name} ({side}): / benchopt time a block {ratio:.2f}x"
            if reach[side] and reach["benchopt"]:
                calls = reach[side] / reach["benchopt"]
                line += (
                    f", oracle calls to the matched loss {calls:.2f}x, time to it "
                    f"{calls * ratio:.2f}x"
                )
            ratios.append(line)
    lines = [
        "# benchmarks/bilevel_benchopt.py, float64",
        "",
        machine(),
        "",
        f"hpo_logreg's digits problem; batch {args.batch}, blocks of "
        f"{args.eval_freq} outer steps, {args.blocks} blocks, {args.seeds} seeds "
        f"per side; steps {STEPS}; benchopt/benchmark_bilevel at commit "
        f"{checkout_commit(args.benchopt)}, benchopt {benchopt.__version__}.",
        "",
        markdown(head, rows),
        "",
        *ratios,
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bilevel_benchopt_{jax.default_backend()}.md").write_text(text)


if __name__ == "__main__":
    main()
