"""iterjax.scan against the papers' own code, same cells and inputs, one process.

* DEER repository (machine-discovery/deer, `--deer PATH`): its demo GRU
  (equinox's GRUCell, 2 units, T = 10000, float32, 16 seeds): Newton iterations
  and error vs `lax.scan`; GRUs with 16 units (T 1024-16384) and 64 units
  (T 4096) in float64: forward and `grad` wall time at matched accuracy (atol
  1e-12, both reach ~1e-14), medians and interquartile ranges of interleaved
  runs, and compiled memory (`--speed-only`: this table alone).
* ELK repository (lindermanlab/elk, `--elk PATH`, needs dynamax 1.0.3 from the
  index): the time of one sweep of dense ELK and quasi-ELK (a fixed number of
  sweeps, so both do the same work) against one DEER sweep, hidden 16, T 4096.
* The ELK paper's own model (its Fig. 4): the AR GRU flow of the checkpoint
  `experiments/elk_exps_figs_4_7_8/argru_sine_wave_L=10000.eqx` in the ELK
  checkout, loaded and sampled by the repository's own code (its packed one-step
  function, noise drivers and initial state), solved by iterjax's DEER,
  quasi-DEER, ELK (σ² = 1e6) and quasi-ELK (σ² = 1e2) with the filter step, and
  quasi-ELK polished by DEER (`polish=DEER()`), float32, atol 1e-4: sweeps, max
  error and the paper's error measure (mean absolute deviation of the sampled
  coordinate) against sequential sampling.
* ParaDiGMS's sliding window, restated from the paper (its repository is
  PyTorch + diffusers): the 2-D diffusion chain of `picard_diffusion` (N = 200
  DDIM steps), windows 20 and 80: passes, model evaluations and error vs
  sequential DDIM, against `iterjax.sequence.Picard(window=W)` at the same
  tolerance on the largest update of a step.

Neither repository is on the package index, and none of their code is copied
here: pass local git checkouts (README: "Benchmarks against the papers' code").
Rows whose repository is missing are skipped, and the script says which.

Run: python benchmarks/sequence_peers.py --deer ../deer --elk ../elk [--quick]
"""

import argparse
import importlib
import pathlib
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import iterjax as ij  # noqa: E402
from benchmarks._common import RESULTS, compiled_bytes, machine, markdown  # noqa: E402
from benchmarks._common import load as load_average  # noqa: E402
from iterjax.diagnostics import time_calls, timings  # noqa: E402
from iterjax.experiments.common import cells, diffusion  # noqa: E402


def load(path, module):
    """`module` from the checkout at `path`, or None (and why) without it."""
    if path is None:
        return None, "no path given"
    root = pathlib.Path(path).resolve()
    if not (root / module.split(".")[0]).is_dir():
        return None, f"{root} holds no `{module.split('.')[0]}` package"
    sys.path.insert(0, str(root))
    try:
        return importlib.import_module(module), None
    except ImportError as e:  # a dependency of the peer is missing
        return None, f"importing {module}: {e}"


def gru(hidden, T, seed, dtype):
    """(cell(h, x), h0, xs) of a random GRU with `hidden` units and inputs."""
    k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
    p = jax.tree.map(lambda a: a.astype(dtype), cells.gru_params(k1, hidden, hidden))
    xs = jax.random.normal(k2, (T, hidden), dtype)
    return (lambda h, x: cells.gru_cell(p, h, x)), jnp.zeros(hidden, dtype), xs


def demo_gru(seed, T=10000, dim=2):
    """The DEER repository's demo cell: equinox's GRUCell(2, 2) in float32."""
    import equinox as eqx

    key, k1, k2 = jax.random.split(jax.random.PRNGKey(seed), 3)
    cell = eqx.nn.GRUCell(dim, dim, key=k1)
    params, static = eqx.partition(cell, eqx.is_array)
    cell = eqx.combine(jax.tree.map(lambda a: a.astype(jnp.float32), params), static)
    xs = jax.random.normal(k2, (T, dim), jnp.float32)
    return (lambda h, x: cell(x, h)), jnp.zeros(dim, jnp.float32), xs


def reference(cell, h0, xs):
    return jax.jit(lambda: jax.lax.scan(lambda h, x: (cell(h, x),) * 2, h0, xs)[1])()


def deer_repo(peer, cell, h0, xs, **options):
    """The DEER repository's `seq1d` on `cell` (its default tolerances unless
    given: atol 1e-4, rtol 1e-3 in float32; 1e-6, 1e-4 in float64)."""
    method = peer.DEER(**options)
    return peer.seq1d(lambda h, x, _: cell(h, x), h0, xs, None, method=method)


def deer_repo_iterations(peer, cell, h0, xs):
    """The DEER repository's output and its number of Newton iterations n. It
    reports success when n < max_iter, so n is the smallest such max_iter - 1."""
    for k in range(2, 102):
        out = deer_repo(peer, cell, h0, xs, max_iter=k)
        if bool(jnp.all(out.success)):
            return out.value, k - 1
    return out.value, None


def iterjax_deer(cell, h0, xs, atol):
    f = lambda h, x: (cell(h, x),) * 2
    _, ys, stats = jax.jit(lambda xs: ij.scan(f, h0, xs, atol=atol, return_stats=True))(
        xs
    )
    return ys, int(stats.num_sweeps)


def accuracy(peer, seeds):
    """float32 demo GRU: iterations and error of both, per seed; float64 hidden 16."""
    rows = []
    for seed in range(seeds):
        cell, h0, xs = demo_gru(seed)
        ref = reference(cell, h0, xs)
        out, k = deer_repo_iterations(peer, cell, h0, xs)
        ys, n = iterjax_deer(cell, h0, xs, atol=1e-6)
        e_peer = float(jnp.max(jnp.abs(out - ref)))
        e_ij = float(jnp.max(jnp.abs(ys - ref)))
        rows.append(("float32 demo GRU (2)", seed, k, e_peer, n, e_ij))
    cell, h0, xs = gru(16, 4096, 0, jnp.float64)
    ref = reference(cell, h0, xs)
    out, k = deer_repo_iterations(peer, cell, h0, xs)
    ys, n = iterjax_deer(cell, h0, xs, atol=1e-6)
    rows.append(
        (
            "float64 GRU (16), T 4096",
            0,
            k,
            float(jnp.max(jnp.abs(out - ref))),
            n,
            float(jnp.max(jnp.abs(ys - ref))),
        )
    )
    return rows


def speed(peer, sizes, rounds):
    """Forward and grad wall time at matched accuracy (float64, atol 1e-12), on
    GRUs of `sizes` (hidden, T): ms median [interquartile range]."""
    rows = []
    for hidden, T in sizes:
        cell, h0, xs = gru(hidden, T, 1, jnp.float64)
        theirs = lambda xs: deer_repo(peer, cell, h0, xs, atol=1e-12, rtol=0.0).value
        mine = lambda xs: ij.scan(lambda h, x: (cell(h, x),) * 2, h0, xs, atol=1e-12)[1]
        loss = lambda run: jax.jit(jax.grad(lambda xs: jnp.sum(jnp.sin(run(xs)))))
        ref = reference(cell, h0, xs)
        calls = {
            "peer": (jax.jit(theirs), (xs,)),
            "mine": (jax.jit(mine), (xs,)),
            "peer_grad": (loss(theirs), (xs,)),
            "mine_grad": (loss(mine), (xs,)),
        }
        t = timings(calls, rounds)
        err = lambda f: float(jnp.max(jnp.abs(f(xs) - ref)))
        mem = lambda f: compiled_bytes(f, xs)[0] / 2**20
        rows.append(
            dict(
                hidden=hidden,
                T=T,
                peer_error=err(calls["peer"][0]),
                iterjax_error=err(calls["mine"][0]),
                forward_ratio=t["mine"].median / t["peer"].median,
                grad_ratio=t["mine_grad"].median / t["peer_grad"].median,
                peer_forward_ms=str(t["peer"]),
                iterjax_forward_ms=str(t["mine"]),
                peer_grad_ms=str(t["peer_grad"]),
                iterjax_grad_ms=str(t["mine_grad"]),
                peer_temp_mb=mem(theirs),
                iterjax_temp_mb=mem(mine),
            )
        )
    return rows


def dynamax_1_indexing(elk):
    """The ELK repository was written for dynamax 0.1.5 (not installable with
    this jax), whose time-varying dynamics have T - 1 entries (the transitions);
    dynamax 1.0.3 indexes them by the step they lead into, T entries, entry 0
    unused. Pad the parameters ELK builds with one leading entry, nothing else."""
    make = elk.make_lgssm_params

    def padded(**kw):
        for key in ("dynamics_weights", "dynamics_bias"):
            kw[key] = jnp.concatenate([kw[key][:1], kw[key]])
        return make(**kw)

    elk.make_lgssm_params = padded


def elk_paper_model(root, lengths, seeds, only=None):
    """iterjax's methods on the ELK paper's own AR GRU (Fig. 4), through the
    repository's code: rows of sweeps and errors per length, seed and method.
    In float32, as the paper (the checkpoint is float32, and the repository's
    loader builds its skeleton in the default dtype)."""
    jax.config.update("jax_enable_x64", False)
    try:
        return _elk_paper_model(root, lengths, seeds, only)
    finally:
        jax.config.update("jax_enable_x64", True)


def _elk_paper_model(root, lengths, seeds, only):
    flow = importlib.import_module("elk.models.flow")
    utils = importlib.import_module("elk.utils.elk_utils")
    sample = importlib.import_module("elk.models.model_utils").sample_AR_many_layers
    path = pathlib.Path(root) / "experiments/elk_exps_figs_4_7_8"
    model = flow.load_flow(str(path / "argru_sine_wave_L=10000.eqx"))
    unpack = utils.make_unpacking_tuple(model)
    f = lambda s, d: (utils.packed_single_step(model, unpack, s, d),) * 2
    methods = {  # name: (method, polish)
        "DEER": (ij.DEER(), None),
        "quasi-DEER": (ij.QuasiDEER(), None),
        "ELK (σ² 1e6)": (ij.ELK(sigmasq=1e6, smooth=False), None),
        "quasi-ELK (σ² 1e2)": (ij.QuasiELK(sigmasq=1e2, smooth=False), None),
        "quasi-ELK (σ² 1e2) + DEER": (
            ij.QuasiELK(sigmasq=1e2, smooth=False),
            ij.DEER(),
        ),
    }
    if only is not None:
        methods = {k: methods[k] for k in only}

    def solver(method, polish):
        kw = dict(method=method, polish=polish, atol=1e-4, return_stats=True)
        return jax.jit(lambda s0, d: ij.scan(f, s0, d, **kw))

    solve = {k: solver(*m) for k, m in methods.items()}
    sequential = jax.jit(lambda s0, d: jax.lax.scan(f, s0, d)[1])
    rows = []
    for L in lengths:
        for seed in seeds:  # as the paper's script: key from seed, L - 1 steps
            key = jax.random.split(jax.random.PRNGKey(seed), 1)[0]
            *_, noises, init = sample(model, L, key=key, dtype=jnp.float32)
            s0, drivers = utils.pack_state(init), noises[1:]
            ref = sequential(s0, drivers)
            for name, run in solve.items():
                _, ys, stats = run(s0, drivers)
                rows.append(
                    dict(
                        T=L,
                        seed=seed,
                        method=name,
                        sweeps=int(stats.num_sweeps),
                        converged=bool(stats.converged),
                        max_error=float(jnp.max(jnp.abs(ys - ref))),
                        mad=float(jnp.mean(jnp.abs(ys[:, 0] - ref[:, 0]))),
                    )
                )
    return rows


def elk_cost(elk_alg, T, hidden, sweeps, rounds):
    """ms per sweep of dense ELK and quasi-ELK, both implementations, and DEER's.

    The repository's dense ELK (dynamax's parallel filter: a batched LAPACK solve
    per combine) hangs on a CPU from T = 256 on, as XLA's CPU thread pool
    deadlocks when several batched solves run at once (iterjax's ELK solves by
    Gauss-Jordan in XLA ops there for that reason); it is timed on GPUs only."""
    cell, h0, xs = gru(hidden, T, 2, jnp.float64)
    guess = jnp.zeros((T, hidden))
    ref = reference(cell, h0, xs)

    def peer(quasi, sigmasq):
        return jax.jit(
            lambda xs: elk_alg(
                cell, h0, guess, xs, sigmasq=sigmasq, num_iters=sweeps, quasi=quasi
            )[-1, 1:]
        )

    def mine(method):
        f = lambda h, x: (cell(h, x),) * 2
        run = lambda xs: ij.scan(f, h0, xs, method=method, atol=0.0, max_sweeps=sweeps)
        return jax.jit(lambda xs: run(xs)[1])

    calls = {
        "deer": mine(ij.DEER()),
        "elk": mine(ij.ELK(sigmasq=1e6, smooth=False)),
        "elk_smoothed": mine(ij.ELK(sigmasq=1e6)),
        "quasi_deer": mine(ij.QuasiDEER()),
        "quasi_elk": mine(ij.QuasiELK(sigmasq=1e2, smooth=False)),
        "peer_quasi_elk": peer(True, 1e2),
    }
    if jax.default_backend() != "cpu":
        calls["peer_elk"] = peer(False, 1e6)
    ms = time_calls({k: (f, (xs,)) for k, f in calls.items()}, rounds)
    per = {k: v / sweeps for k, v in ms.items()}
    peers = dict(elk="peer_elk", elk_smoothed="peer_elk", quasi_elk="peer_quasi_elk")
    return [
        dict(
            method=name,
            ms_per_sweep=per[name],
            vs_deer=per[name] / per["deer"],
            vs_repository=per[name] / per[peers[name]]
            if peers.get(name) in per
            else float("nan"),
            error_after=float(jnp.max(jnp.abs(calls[name](xs) - ref))),
        )
        for name in per
    ]


def windows(N, sizes, tol):
    points = jnp.asarray(diffusion.moons(256, seed=0))
    f = diffusion.ddim_step(points, 0.05)
    xs = diffusion.schedule(N)
    z = jax.random.normal(jax.random.key(1), (128, 2))
    g = lambda c, x: (f(c, x)[0],) * 2
    ref = np.asarray(jax.lax.scan(g, z, xs)[1])
    rows = []
    for W in sizes:
        X, passes, evals = diffusion.paradigms(f, z, xs, W, tol)
        method = ij.sequence.Picard(window=W)
        row = dict(
            window=W,
            paradigms_passes=passes,
            paradigms_evaluations=evals,
            paradigms_error=float(np.max(np.abs(X - ref))),
        )
        for rule in ("tested", "paradigms"):
            kw = dict(method=method, atol=tol, acceptance=rule, return_stats=True)
            _, ys, stats = ij.scan(g, z, xs, **kw)
            sweeps = int(stats.num_sweeps)
            row[f"iterjax_{rule}_sweeps"] = sweeps
            row[f"iterjax_{rule}_evaluations"] = int(stats.evaluations)
            row[f"iterjax_{rule}_computed"] = sweeps * W
            row[f"iterjax_{rule}_error"] = float(np.max(np.abs(np.asarray(ys) - ref)))
        rows.append(row)
    return rows


def fmt(rows):
    """A markdown table of dicts with the same keys; floats to 3 digits."""
    cell = lambda v: f"{v:.3g}" if isinstance(v, float) else str(v)
    return markdown(list(rows[0]), [[cell(v) for v in r.values()] for r in rows])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--deer", help="a git checkout of machine-discovery/deer")
    p.add_argument("--elk", help="a git checkout of lindermanlab/elk")
    p.add_argument("--quick", action="store_true", help="fewer seeds, lengths, runs")
    p.add_argument(
        "--speed-only",
        action="store_true",
        help="only the DEER wall-time table, written to "
        "results/sequence_peers_speed_<platform>.md",
    )
    p.add_argument(
        "--no-speed",
        action="store_true",
        help="every table but the DEER wall-time one (--speed-only's)",
    )
    a = p.parse_args()
    full = (16, [(16, 1024), (16, 4096), (16, 16384), (64, 4096)], 15)
    seeds, sizes, rounds = (4, [(16, 1024)], 5) if a.quick else full
    if a.speed_only:
        fseq1d, why = load(a.deer, "deer.fseq1d")
        if fseq1d is None:
            raise SystemExit(f"--speed-only needs the DEER repository: {why}")
        text = "\n\n".join(
            [
                "# benchmarks/sequence_peers.py --speed-only, float64",
                machine(),
                "## Wall time at matched accuracy (GRU, float64, atol 1e-12)",
                fmt(speed(fseq1d, sizes, rounds)),
                f"Load average (1/5/15 min) at the end: {load_average()}",
            ]
        )
        print(text)
        out = RESULTS / f"sequence_peers_speed_{jax.default_backend()}.md"
        out.write_text(text + "\n")
        return

    print("## ParaDiGMS's window: N = 200 DDIM steps, tolerance 5e-6\n")
    print(fmt(windows(200, [20, 80], 5e-6)))

    fseq1d, why = load(a.deer, "deer.fseq1d")
    if fseq1d is None:
        print(f"\n(skipped the DEER repository's rows: {why})")
    else:
        head = ["cell", "seed", "deer iterations", "deer error", "iterjax sweeps"]
        rows = accuracy(fseq1d, seeds)
        print("\n## Accuracy: DEER repository vs iterjax.DEER(), same cells\n")
        print(fmt([dict(zip(head + ["iterjax error"], r)) for r in rows]))
        ratios = [r[5] / r[3] for r in rows[:-1]]
        print(f"\nfloat32 error ratio iterjax / DEER repo: max {max(ratios):.2f}")
        if not a.no_speed:
            print("\n## Wall time at matched accuracy (GRU, float64, atol 1e-12)\n")
            print(fmt(speed(fseq1d, sizes, rounds)))

    elk, why = load(a.elk, "elk.algs.elk")
    if elk is None:
        print(f"\n(skipped the ELK repository's rows: {why})")
    else:
        backend = jax.default_backend()
        print(f"\n## One sweep of ELK (GRU 16, T 4096, float64, 8 sweeps, {backend})\n")
        dynamax_1_indexing(elk)
        print(fmt(elk_cost(elk.elk_alg, 4096, 16, 8, rounds)))
        lengths, seeds = (
            ([2000], [1, 2]) if a.quick else ([2000, 10000], [1, 2, 3, 4, 5])
        )
        print("\n## The ELK paper's own AR GRU (Fig. 4), float32, atol 1e-4\n")
        rows = elk_paper_model(a.elk, lengths, seeds)
        print(fmt(rows))
        print("\nmedian sweeps per T, and as a fraction of DEER's:")
        for L in lengths:
            med = {
                m: float(
                    np.median(
                        [r["sweeps"] for r in rows if (r["T"], r["method"]) == (L, m)]
                    )
                )
                for m in dict.fromkeys(r["method"] for r in rows)
            }
            print(L, {m: f"{v:.0f} ({v / med['DEER']:.2f}x)" for m, v in med.items()})


if __name__ == "__main__":
    main()
