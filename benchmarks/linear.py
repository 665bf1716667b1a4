"""iterjax's linear solvers and classical iterations side by side with their peers.

One process, the same systems for everyone:

1. Krylov: the 2-D Poisson problem and a Darcy-flow problem (-∇·(k∇u) = 1 with
   a log-normal, smoothed k), n x n interior grid, matrix-free 5-point stencil
   (`iterjax.gallery.Poisson2D`). iterjax's CG (plain, Jacobi-preconditioned,
   Chebyshev-polynomial-preconditioned) and GMRES against lineax 0.1.1's CG and
   GMRES (and the Chebyshev semi-iteration, no inner products),
   `jax.scipy.sparse.linalg.cg`, and pyamg 5.4.1's CG and smoothed-
   aggregation AMG-preconditioned CG on the assembled matrix (NumPy/SciPy).
   Also iterjax's CG preconditioned by a geometric multigrid V(1,1) cycle
   (rediscretised or Galerkin coarse levels; its setup inside the timed call)
   beside pyamg's AMG, whose setup is timed apart, and iterjax's own
   smoothed-aggregation AMG (`SmoothedAggregation`, set up on the host, timed
   apart) against pyamg's at 63², 127² and 255², with either library's
   smoothers and with Jacobi smoothing in both.
   Stopping rule: ‖b - Ax‖₂ <= 1e-8 ‖b‖₂; lineax checks its residual once per
   restart cycle and ends lower, so iterjax is also run to lineax's residual,
   and the ratios compare those runs. Reported: operator products (where the
   library reports them), the true final relative residual, the median wall
   time with its interquartile range over the timed rounds, and the compile
   time apart.
2. Kernel ridge regression (sklearn's digits, Gaussian kernel): CG, CG with
   the randomized Nyström preconditioner and sketch-and-project against
   jax.scipy's and SciPy's CG and a dense Cholesky solve (products include the
   Nyström build's ℓ).
3. Sinkhorn against ott-jax 0.6.0 (plain and Anderson-accelerated), at matched
   marginal error (1e-10, L1), on `sinkhorn_newton`'s point clouds.
4. Bradley-Terry against choix 0.4.1 (ILSR and MM), to the same scores.

Run: make bench   (or: python benchmarks/linear.py [--quick])
"""

import argparse
import pathlib
import sys
import time
import warnings

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
warnings.filterwarnings("ignore")

import iterjax as ij  # noqa: E402
from benchmarks._common import (  # noqa: E402
    RESULTS,
    TIME_COLUMNS,
    load,
    machine,
    markdown,
    time_cells,
)
from iterjax.classical import bradley_terry, marginal_error, sinkhorn  # noqa: E402
from iterjax.diagnostics import timings  # noqa: E402
from iterjax.experiments import sinkhorn_newton  # noqa: E402
from iterjax.experiments.bradley_terry import comparisons  # noqa: E402

RTOL = 1e-8


def _value_and_steps(solution):
    return solution.value, solution.stats["num_steps"]


def krylov_rows(name, op, rounds):
    import lineax as lx
    import pyamg

    n = op.k.shape[0]
    b = jnp.ones((n, n))
    diag = op.diagonal()
    relres = lambda x: float(jnp.linalg.norm(b - op(x)) / jnp.linalg.norm(b))
    peers = {
        "lineax CG": lx.CG(rtol=RTOL, atol=0.0, norm=ij.two_norm),
        "lineax GMRES": lx.GMRES(rtol=RTOL, atol=0.0, norm=ij.two_norm, restart=50),
    }
    shape = jax.ShapeDtypeStruct(b.shape, b.dtype)
    operator = lx.FunctionLinearOperator(op, shape, tags=lx.positive_semidefinite_tag)
    calls, products, answers = {}, {}, {}
    for label, solver in peers.items():
        f = jax.jit(
            lambda b, s=solver: _value_and_steps(
                lx.linear_solve(operator, b, s, throw=False)
            )
        )
        calls[label] = (f, (b,))
        answers[label], steps = f(b)
        products[label] = f"{int(steps)} steps"
    # lineax checks its residual once per restart cycle, so it ends below the
    # tolerance asked: iterjax is also run to the residual lineax reached
    matched = {k: relres(answers[f"lineax {k}"]) for k in ("CG", "GMRES")}
    mg = lambda coarsening: ij.linear.Multigrid(coarsening=coarsening)
    a = op.assemble()
    amg = ij.linear.SmoothedAggregation().setup(a)  # host setup, timed apart
    ours = {
        "iterjax CG": ij.CG(rtol=RTOL),
        "iterjax CG, at lineax CG's residual": ij.CG(rtol=matched["CG"]),
        "iterjax CG + Jacobi": ij.CG(
            rtol=RTOL,
            preconditioner=ij.linear.FunctionPreconditioner(lambda r: r / diag),
        ),
        "iterjax CG + Chebyshev(4)": ij.CG(
            rtol=RTOL, preconditioner=ij.linear.ChebyshevPreconditioner(4)
        ),
        "iterjax CG + multigrid V(1,1)": ij.CG(
            rtol=RTOL, preconditioner=mg("rediscretise")
        ),
        "iterjax CG + Galerkin multigrid V(1,1)": ij.CG(
            rtol=RTOL, preconditioner=mg("galerkin")
        ),
        "iterjax CG + SA-AMG": ij.CG(rtol=RTOL, preconditioner=amg),
        "iterjax GMRES": ij.GMRES(rtol=RTOL, restart=50),
        "iterjax GMRES, at lineax GMRES's residual": ij.GMRES(
            rtol=matched["GMRES"], restart=50
        ),
        "iterjax GMRES, reorthogonalised, at lineax's residual": ij.GMRES(
            rtol=matched["GMRES"], restart=50, reorthogonalise=True
        ),
        "iterjax Chebyshev iteration": ij.linear.Chebyshev(rtol=RTOL),
    }
    for label, solver in ours.items():
        f = jax.jit(lambda b, s=solver: s.solve_with_stats(op, b))
        calls[label] = (f, (b,))
        answers[label], stats = f(b)
        products[label] = int(stats.num_matvecs)
    per_apply = amg.build(op, b)[2]  # CG's steps: (products - M b) / (1 + M)
    steps = (products["iterjax CG + SA-AMG"] - per_apply) // (1 + per_apply)
    products["iterjax CG + SA-AMG"] = f"{steps} steps"
    calls["iterjax SA-AMG setup"] = (
        lambda: ij.linear.SmoothedAggregation().setup(a),
        (),
    )
    products["iterjax SA-AMG setup"], answers["iterjax SA-AMG setup"] = "-", None
    f = jax.jit(lambda b: jax.scipy.sparse.linalg.cg(op, b, tol=RTOL, atol=0.0))
    calls["jax.scipy cg"] = (f, (b,))
    answers["jax.scipy cg"] = f(b)[0]
    products["jax.scipy cg"] = "n/a"
    # pyamg on the assembled matrix (NumPy), its AMG setup timed apart
    rhs = np.ones(n * n)
    ml = pyamg.smoothed_aggregation_solver(a)
    pyamg_solvers = {  # solve(residuals): x, appending each step's residual
        "pyamg cg": lambda res: pyamg.krylov.cg(a, rhs, tol=RTOL, residuals=res)[0],
        "pyamg SA-AMG + CG": lambda res: ml.solve(
            rhs, tol=RTOL, accel="cg", maxiter=1000, residuals=res
        ),
    }
    for label, solve in pyamg_solvers.items():
        residuals = []
        answers[label] = np.asarray(solve(residuals)).reshape(n, n)
        products[label] = f"{len(residuals) - 1} steps"
        calls[label] = ((lambda s=solve: s([])), ())
    calls["pyamg SA-AMG setup"] = (lambda: pyamg.smoothed_aggregation_solver(a), ())
    products["pyamg SA-AMG setup"], answers["pyamg SA-AMG setup"] = "-", None
    t = timings(calls, rounds)
    rows = [
        [
            name,
            k,
            products[k],
            "-" if answers[k] is None else f"{relres(jnp.asarray(answers[k])):.1e}",
            *time_cells(t[k]),
        ]
        for k in calls
    ]
    ratio = lambda ours, peer: t[ours].median / t[peer].median
    ratios = {
        "iterjax CG / lineax CG": ratio(
            "iterjax CG, at lineax CG's residual", "lineax CG"
        ),
        "iterjax GMRES / lineax GMRES": ratio(
            "iterjax GMRES, at lineax GMRES's residual", "lineax GMRES"
        ),
        "iterjax CG + Galerkin multigrid / pyamg SA-AMG + CG": ratio(
            "iterjax CG + Galerkin multigrid V(1,1)", "pyamg SA-AMG + CG"
        ),
        "iterjax CG + SA-AMG / pyamg SA-AMG + CG": ratio(
            "iterjax CG + SA-AMG", "pyamg SA-AMG + CG"
        ),
        "iterjax SA-AMG setup / pyamg SA-AMG setup": ratio(
            "iterjax SA-AMG setup", "pyamg SA-AMG setup"
        ),
    }
    return rows, ratios


GRID_OPERATORS = {2: ij.gallery.Poisson2D, 3: ij.gallery.Poisson3D}


def amg_rows(grids, rounds, ndim=2):
    """Smoothed-aggregation AMG + CG against pyamg's on the Poisson and Darcy
    systems of each grid side (n^ndim unknowns): CG steps, solve time (setup
    apart, timed too), the true relative residual. pyamg smooths with
    symmetric Gauss-Seidel by default; its run with iterjax's Jacobi smoothing
    is the like-for-like count (iterjax's Chebyshev smoother is its default).
    In 3-D iterjax's geometric multigrid (rediscretised V(1,1)) + CG joins."""
    import pyamg

    rows = []
    for name, sigma in (("poisson", 0.0), ("darcy", 1.0)):
        for n in grids:
            shape = (n,) * ndim
            k = (
                ij.gallery.lognormal_coefficient(n, ndim=ndim)
                if sigma
                else np.ones(shape)
            )
            op = GRID_OPERATORS[ndim](jnp.asarray(k))
            a = op.assemble()
            rhs = np.ones(n**ndim)
            relres = lambda x: (
                np.linalg.norm(rhs - a @ np.ravel(x)) / np.linalg.norm(rhs)
            )
            calls, steps, answers = {}, {}, {}
            for label, amg in (
                ("iterjax SA-AMG + CG", ij.linear.SmoothedAggregation()),
                (
                    "iterjax SA-AMG (Jacobi) + CG",
                    ij.linear.SmoothedAggregation(smoother="jacobi", degree=1),
                ),
            ):
                ready = amg.setup(a)
                f = jax.jit(
                    lambda amg, b: ij.CG(
                        rtol=RTOL, preconditioner=amg
                    ).solve_with_stats(op, b)
                )
                b = jnp.ones(shape)
                x, stats = f(ready, b)
                calls[label] = (f, (ready, b))
                steps[label] = (int(stats.num_matvecs) - ready.work) // (1 + ready.work)
                answers[label] = x
                calls[label + " setup"] = ((lambda amg=amg: amg.setup(a)), ())
            if ndim == 3:  # geometric multigrid: no setup beyond the cycle's own
                label = "iterjax multigrid V(1,1) + CG"
                mg = ij.CG(rtol=RTOL, preconditioner=ij.linear.Multigrid())
                f = jax.jit(lambda b: mg.solve_with_stats(op, b))
                b = jnp.ones(shape)
                x, stats = f(b)
                calls[label], answers[label] = (f, (b,)), x
                _, cost, per = ij.linear.Multigrid().build(op, b)  # in products
                steps[label] = (int(stats.num_matvecs) - cost - per) // (1 + per)
            jacobi = ("jacobi", {"omega": 4 / 3, "iterations": 1})
            for label, options in (
                ("pyamg SA-AMG + CG", {}),
                (
                    "pyamg SA-AMG (Jacobi) + CG",
                    {"presmoother": jacobi, "postsmoother": jacobi},
                ),
            ):
                ml = pyamg.smoothed_aggregation_solver(a, **options)
                residuals = []
                solve = lambda res, ml=ml: ml.solve(
                    rhs, tol=RTOL, accel="cg", maxiter=1000, residuals=res
                )
                answers[label] = solve(residuals)
                steps[label] = len(residuals) - 1
                calls[label] = ((lambda s=solve: s([])), ())
                calls[label + " setup"] = (
                    (lambda o=options: pyamg.smoothed_aggregation_solver(a, **o)),
                    (),
                )
            t = timings(calls, rounds)
            for label in calls:
                setup = label.endswith(" setup")
                rows.append(
                    [
                        name,
                        f"{n}{'²' if ndim == 2 else '³'}",
                        label,
                        "-" if setup else steps[label],
                        "-" if setup else f"{relres(answers[label]):.1e}",
                        *time_cells(t[label]),
                    ]
                )
    return rows


def kernel_rows(samples, mu, rank, rounds):
    """Kernel ridge regression on sklearn's digits: (K + μ I) α = y with K the
    Gaussian kernel (bandwidth: the median pairwise distance), y the centred
    labels; CG, Nyström-preconditioned CG and sketch-and-project against
    jax.scipy's and SciPy's CG and a dense Cholesky solve."""
    import scipy.linalg
    import scipy.sparse.linalg
    from sklearn.datasets import load_digits

    X, labels = load_digits(return_X_y=True)
    X, labels = X[:samples] / 16.0, labels[:samples].astype(float)
    d2 = ((X[:, None] - X[None]) ** 2).sum(-1)
    K = np.exp(-d2 / (2 * np.median(d2)))
    A_np = K + mu * np.eye(samples)
    y = labels - labels.mean()
    A, b = jnp.asarray(A_np), jnp.asarray(y)
    relres = lambda x: float(
        np.linalg.norm(A_np @ np.asarray(x) - y) / np.linalg.norm(y)
    )
    ours = {
        "iterjax CG": ij.CG(rtol=RTOL),
        f"iterjax CG + Nyström(ℓ = {rank})": ij.CG(
            rtol=RTOL,
            preconditioner=ij.linear.NystromPreconditioner(rank=rank, shift=mu),
        ),
        "iterjax sketch-and-project (block 100)": ij.linear.SketchAndProject(
            block=100, rtol=RTOL, max_epochs=2000
        ),
    }
    calls, products, answers = {}, {}, {}
    for label, solver in ours.items():
        f = jax.jit(lambda b, s=solver: s.solve_with_stats(A, b))
        answers[label], stats = f(b)
        calls[label] = (f, (b,))
        products[label] = int(stats.num_matvecs)
    f = jax.jit(lambda b: jax.scipy.sparse.linalg.cg(lambda v: A @ v, b, tol=RTOL))
    answers["jax.scipy cg"], products["jax.scipy cg"] = f(b)[0], "n/a"
    calls["jax.scipy cg"] = (f, (b,))

    def scipy_cg():
        count = []
        x, _ = scipy.sparse.linalg.cg(
            A_np, y, rtol=RTOL, atol=0.0, maxiter=20000, callback=count.append
        )
        return x, len(count)

    answers["scipy cg"], steps = scipy_cg()
    products["scipy cg"] = f"{steps} steps"
    calls["scipy cg"] = (scipy_cg, ())
    cholesky = lambda: scipy.linalg.cho_solve(scipy.linalg.cho_factor(A_np), y)
    answers["scipy Cholesky (dense)"], products["scipy Cholesky (dense)"] = (
        cholesky(),
        "-",
    )
    calls["scipy Cholesky (dense)"] = (cholesky, ())
    t = timings(calls, rounds)
    rows = [
        [label, products[label], f"{relres(answers[label]):.1e}", *time_cells(t[label])]
        for label in calls
    ]
    return rows


def sinkhorn_rows(points, epsilons, rounds):
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import acceleration
    from ott.solvers.linear import sinkhorn as ott_sinkhorn

    cost, a, b = sinkhorn_newton.problem(points, 0)
    rows, ratios = [], {}
    for eps in epsilons:
        ours = {
            "iterjax sinkhorn": ij.Picard(),
            "iterjax anderson": ij.Anderson(),
            "iterjax sinkhorn-newton": ij.Switched(
                ij.Picard(), ij.Backtracking(ij.Newton()), after=20
            ),
        }
        calls, iters, errors = {}, {}, {}
        for label, solver in ours.items():
            f = jax.jit(
                lambda c, s=solver, eps=eps: sinkhorn(
                    c, a, b, eps, solver=s, atol=1e-10, max_steps=50000
                )
            )
            sol = f(cost)
            calls[label] = (f, (cost,))
            iters[label] = int(sol.num_steps)
            errors[label] = float(marginal_error(cost, a, b, sol.value, eps))
        for label, anderson in (
            ("ott-jax sinkhorn", None),
            ("ott-jax anderson", acceleration.AndersonAcceleration(memory=5)),
        ):

            def solve(c, eps=eps, anderson=anderson):
                geom = geometry.Geometry(cost_matrix=c, epsilon=eps)
                solver = ott_sinkhorn.Sinkhorn(
                    threshold=1e-10, max_iterations=50000, anderson=anderson
                )
                return solver(linear_problem.LinearProblem(geom, a, b))

            f = jax.jit(solve)
            out = f(cost)
            calls[label] = (f, (cost,))
            iters[label] = int(out.n_iters)
            errors[label] = float(marginal_error(cost, a, b, (out.f, out.g), eps))
        t = timings(calls, rounds)
        for k in calls:
            rows.append(
                [f"{eps:g}", k, iters[k], f"{errors[k]:.1e}", *time_cells(t[k])]
            )
        best_ott = min(t["ott-jax sinkhorn"].median, t["ott-jax anderson"].median)
        best_ours = min(t[k].median for k in ours)
        ratios[eps] = best_ours / best_ott
    return rows, ratios


def bradley_terry_rows(players, densities, rounds):
    import choix

    rows, ratios = [], {}
    for density in densities:
        wins, _ = comparisons(players, density, 4, 1.0, 0)
        w = np.asarray(wins)
        data = [
            (i, j)
            for i, j in zip(*np.nonzero(w), strict=True)
            for _ in range(int(w[i, j]))
        ]
        calls, iters, scores = {}, {}, {}
        for label, iteration, solver in (
            ("iterjax zermelo", "zermelo", ij.Picard()),
            ("iterjax newman", "newman", ij.Picard()),
            ("iterjax newman + anderson", "newman", ij.Anderson()),
        ):
            f = jax.jit(
                lambda w, it=iteration, s=solver: bradley_terry(
                    w, iteration=it, solver=s, atol=1e-10, max_steps=100000
                )
            )
            sol = f(wins)
            calls[label] = (f, (wins,))
            iters[label] = int(sol.num_steps)
            scores[label] = np.asarray(sol.value)
        t = timings(calls, rounds)
        cells = {k: time_cells(v) for k, v in t.items()}
        for label, fn in (
            ("choix ilsr_pairwise", choix.ilsr_pairwise),
            ("choix mm_pairwise", choix.mm_pairwise),
        ):
            kw = dict(tol=1e-10, max_iter=100000)
            start = time.perf_counter()  # pure Python: no warm-up, one call
            params = fn(players, data, **kw)
            cells[label] = [
                f"{1e3 * (time.perf_counter() - start):.3g} (one call)",
                "-",
            ]
            iters[label] = "-"
            scores[label] = params - params.mean()
        ref = scores["choix ilsr_pairwise"]
        for k in cells:
            diff = np.abs(scores[k] - ref).max()
            rows.append([f"{density:g}", k, iters[k], f"{diff:.1e}", *cells[k]])
        best = min(t["iterjax newman"].median, t["iterjax newman + anderson"].median)
        ratios[density] = best / float(cells["choix ilsr_pairwise"][0].split()[0])
    return rows, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 5 rounds")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument(
        "--amg-3d",
        action="store_true",
        help="only SA-AMG + CG against pyamg on 3-D grids (linear_amg3d_<backend>.md)",
    )
    args = parser.parse_args()
    if args.amg_3d:
        return amg_3d(args)
    rounds = 5 if args.quick else 10
    grid = 31 if args.quick else 63
    lines = [
        f"# benchmarks/linear.py, float64, {rounds} timed rounds after a first call",
        "",
        machine(),
        "",
        f"## Krylov, {grid} x {grid} grid, ‖b - Ax‖ <= {RTOL:g} ‖b‖",
        "",
    ]
    rows, ratios = [], {}
    for name, k in (
        ("poisson", np.ones((grid, grid))),
        ("darcy", ij.gallery.lognormal_coefficient(grid)),
    ):
        r, ratios[name] = krylov_rows(
            name, ij.gallery.Poisson2D(jnp.asarray(k)), rounds
        )
        rows += r
    head = ["system", "solver", "products", "rel. residual", *TIME_COLUMNS]
    lines += [markdown(head, rows), ""]
    for name, r in ratios.items():
        lines.append(
            f"{name}, median time ratios: "
            + ", ".join(f"{k} {v:.2f}x" for k, v in r.items())
        )
    grids = (31, 63) if args.quick else (63, 127, 255)
    lines += ["", "## SA-AMG + CG against pyamg, by grid side", ""]
    head = ["system", "grid", "solver", "CG steps", "rel. residual", *TIME_COLUMNS]
    lines += [markdown(head, amg_rows(grids, rounds)), ""]
    samples, mu, rank = (500, 1e-4, 50) if args.quick else (1500, 1e-4, 200)
    lines += [
        "",
        f"## Kernel ridge regression, sklearn digits, n = {samples}, μ = {mu:g}, "
        f"‖b - Ax‖ <= {RTOL:g} ‖b‖",
        "",
    ]
    head = ["solver", "products", "rel. residual", *TIME_COLUMNS]
    lines += [markdown(head, kernel_rows(samples, mu, rank, rounds)), ""]
    epsilons = (0.01,) if args.quick else (0.01, 0.001)
    points = 100 if args.quick else 200
    lines += ["", f"## Sinkhorn, {points} x {points} points, marginal error 1e-10", ""]
    rows, ratios = sinkhorn_rows(points, epsilons, rounds)
    head = ["epsilon", "solver", "iterations", "marginal error", *TIME_COLUMNS]
    lines += [markdown(head, rows), ""]
    lines.append(
        "best iterjax / best ott-jax median time: "
        + ", ".join(f"eps {k:g}: {v:.2f}x" for k, v in ratios.items())
    )
    players = 100 if args.quick else 300
    densities = (1.0,) if args.quick else (1.0, 0.1, 0.05)
    lines += ["", f"## Bradley-Terry, {players} players, to a step of 1e-10", ""]
    rows, ratios = bradley_terry_rows(players, densities, rounds)
    head = ["density", "method", "iterations", "max |s - s_choix ilsr|", *TIME_COLUMNS]
    lines += [markdown(head, rows), ""]
    lines.append(
        "best iterjax newman / choix ilsr time: "
        + ", ".join(f"density {k:g}: {v:.2f}x" for k, v in ratios.items())
    )
    finish(lines, args, "linear")


def finish(lines, args, stem):
    """Print the report, ended by the load average; unless --quick, write it
    to `<out>/<stem>_<backend>.md`."""
    lines += ["", f"Load average (1/5/15 min) at the end: {load()}"]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.quick:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}_{jax.default_backend()}.md").write_text(text)


def amg_3d(args):
    """The 3-D section alone, in its own file."""
    rounds = 5 if args.quick else 10
    grids = (15,) if args.quick else (15, 31, 63)
    lines = [
        f"# benchmarks/linear.py --amg-3d, float64, {rounds} timed rounds after a "
        "first call",
        "",
        machine(),
        "",
        f"## SA-AMG + CG against pyamg, 3-D grids, ‖b - Ax‖ <= {RTOL:g} ‖b‖",
        "",
    ]
    head = ["system", "grid", "solver", "CG steps", "rel. residual", *TIME_COLUMNS]
    lines += [markdown(head, amg_rows(grids, rounds, ndim=3))]
    finish(lines, args, "linear_amg3d")


if __name__ == "__main__":
    main()
