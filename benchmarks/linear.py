"""iterjax's linear solvers and classical iterations side by side with their peers.

One process, the same systems for everyone:

1. Krylov: the 2-D Poisson problem and a Darcy-flow problem (-∇·(k∇u) = 1 with
   a log-normal, smoothed k), n x n interior grid, matrix-free 5-point stencil
   (`iterjax.gallery.Poisson2D`). iterjax's CG (plain, Jacobi-preconditioned,
   Chebyshev-polynomial-preconditioned) and GMRES against lineax 0.1.1's CG and
   GMRES (and the Chebyshev semi-iteration, no inner products),
   `jax.scipy.sparse.linalg.cg`, and pyamg 5.4.1's CG and smoothed-
   aggregation AMG-preconditioned CG on the assembled matrix (NumPy/SciPy).
   Stopping rule: ‖b - Ax‖₂ <= 1e-8 ‖b‖₂. Reported: operator products (where the
   library reports them), the true final relative residual, median wall time.
2. Sinkhorn against ott-jax 0.6.0 (plain and Anderson-accelerated), at matched
   marginal error (1e-10, L1), on `sinkhorn_newton`'s point clouds.
3. Bradley-Terry against choix 0.4.1 (ILSR and MM), to the same scores.

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
from benchmarks._common import markdown  # noqa: E402
from iterjax.classical import bradley_terry, marginal_error, sinkhorn  # noqa: E402
from iterjax.diagnostics import time_calls  # noqa: E402
from iterjax.experiments import sinkhorn_newton  # noqa: E402
from iterjax.experiments.bradley_terry import comparisons  # noqa: E402

RTOL = 1e-8


def darcy_coefficient(n, seed=0, sigma=1.0, width=4):
    """exp(σ g), g a white noise smoothed by a box filter of `width`, unit variance."""
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(n + width, n + width))
    c = np.cumsum(np.cumsum(g, 0), 1)
    c = np.pad(c, ((1, 0), (1, 0)))
    w = width
    box = (c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w])[:n, :n]
    return np.exp(sigma * (box - box.mean()) / box.std())


def assemble(op):
    """The scipy CSR matrix of a `Poisson2D` (row-major unknowns)."""
    import scipy.sparse as sp

    n = op.k.shape[0]
    e, w, no, so = (np.asarray(a) for a in op._edges())
    idx = np.arange(n * n).reshape(n, n)
    rows, cols, vals = [idx.ravel()], [idx.ravel()], [(e + w + no + so).ravel()]
    for coef, di, dj in ((e, 0, 1), (w, 0, -1), (no, -1, 0), (so, 1, 0)):
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        ok = (0 <= i + di) & (i + di < n) & (0 <= j + dj) & (j + dj < n)
        rows.append(idx[ok])
        cols.append(idx[(i + di)[ok], (j + dj)[ok]])
        vals.append(-coef[ok])
    return sp.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(n * n, n * n),
    )


def _value_and_steps(solution):
    return solution.value, solution.stats["num_steps"]


def krylov_rows(name, op, rounds):
    import lineax as lx
    import pyamg

    n = op.k.shape[0]
    b = jnp.ones((n, n))
    diag = op.diagonal()
    relres = lambda x: float(jnp.linalg.norm(b - op(x)) / jnp.linalg.norm(b))
    ours = {
        "iterjax CG": ij.CG(rtol=RTOL),
        # lineax stops at about a 30x smaller residual: the same accuracy
        "iterjax CG, rtol/30": ij.CG(rtol=RTOL / 30),
        "iterjax CG + Jacobi": ij.CG(
            rtol=RTOL,
            preconditioner=ij.linear.FunctionPreconditioner(lambda r: r / diag),
        ),
        "iterjax CG + Chebyshev(4)": ij.CG(
            rtol=RTOL, preconditioner=ij.linear.ChebyshevPreconditioner(4)
        ),
        "iterjax GMRES": ij.GMRES(rtol=RTOL, restart=50),
        "iterjax Chebyshev iteration": ij.linear.Chebyshev(rtol=RTOL),
    }
    calls, products, answers = {}, {}, {}
    for label, solver in ours.items():
        f = jax.jit(lambda b, s=solver: s.solve_with_stats(op, b))
        calls[label] = (f, (b,))
        answers[label], stats = f(b)
        products[label] = int(stats.num_matvecs)
    shape = jax.ShapeDtypeStruct(b.shape, b.dtype)
    operator = lx.FunctionLinearOperator(op, shape, tags=lx.positive_semidefinite_tag)
    peers = {
        "lineax CG": lx.CG(rtol=RTOL, atol=0.0, norm=ij.two_norm),
        "lineax GMRES": lx.GMRES(rtol=RTOL, atol=0.0, norm=ij.two_norm, restart=50),
    }
    for label, solver in peers.items():
        f = jax.jit(
            lambda b, s=solver: _value_and_steps(
                lx.linear_solve(operator, b, s, throw=False)
            )
        )
        calls[label] = (f, (b,))
        answers[label], steps = f(b)
        products[label] = f"{int(steps)} steps"
    f = jax.jit(lambda b: jax.scipy.sparse.linalg.cg(op, b, tol=RTOL, atol=0.0))
    calls["jax.scipy cg"] = (f, (b,))
    answers["jax.scipy cg"] = f(b)[0]
    products["jax.scipy cg"] = "n/a"
    ms = time_calls(calls, rounds)
    rows = [
        [name, k, products[k], f"{relres(answers[k]):.1e}", f"{ms[k]:.2f}"]
        for k in calls
    ]
    # pyamg on the assembled matrix (NumPy; wall time of the solve alone)
    a = assemble(op)
    rhs = np.ones(n * n)
    ml = pyamg.smoothed_aggregation_solver(a)
    pyamg_solvers = {
        "pyamg cg": lambda r, res: pyamg.krylov.cg(a, r, tol=RTOL, residuals=res)[0],
        "pyamg SA-AMG + CG": lambda r, res: ml.solve(
            r, tol=RTOL, accel="cg", maxiter=1000, residuals=res
        ),
    }
    for label, solve in pyamg_solvers.items():
        residuals = []
        x = solve(rhs, residuals)
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            solve(rhs, [])
            times.append(1e3 * (time.perf_counter() - start))
        res = np.linalg.norm(rhs - a @ x) / np.linalg.norm(rhs)
        steps = f"{len(residuals) - 1} steps"
        rows.append([name, label, steps, f"{res:.1e}", f"{np.median(times):.2f}"])
    ratio = ms["iterjax CG, rtol/30"] / ms["lineax CG"]
    return rows, ratio


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
        ms = time_calls(calls, rounds)
        for k in calls:
            rows.append([f"{eps:g}", k, iters[k], f"{errors[k]:.1e}", f"{ms[k]:.2f}"])
        best_ott = min(ms["ott-jax sinkhorn"], ms["ott-jax anderson"])
        best_ours = min(ms[k] for k in ours)
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
        ms = time_calls(calls, rounds)
        for label, fn in (
            ("choix ilsr_pairwise", choix.ilsr_pairwise),
            ("choix mm_pairwise", choix.mm_pairwise),
        ):
            kw = dict(tol=1e-10, max_iter=100000)
            start = time.perf_counter()  # pure Python: no warm-up, one call
            params = fn(players, data, **kw)
            ms[label] = 1e3 * (time.perf_counter() - start)
            iters[label] = "-"
            scores[label] = params - params.mean()
        ref = scores["choix ilsr_pairwise"]
        for k in ms:
            diff = np.abs(scores[k] - ref).max()
            rows.append([f"{density:g}", k, iters[k], f"{diff:.1e}", f"{ms[k]:.2f}"])
        best = min(ms["iterjax newman"], ms["iterjax newman + anderson"])
        ratios[density] = best / ms["choix ilsr_pairwise"]
    return rows, ratios


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, 3 rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else 10
    grid = 32 if args.quick else 64
    print(f"## Krylov, {grid} x {grid} grid, ‖b - Ax‖ <= {RTOL:g} ‖b‖\n")
    rows, cg_ratio = [], {}
    for name, k in (
        ("poisson", np.ones((grid, grid))),
        ("darcy", darcy_coefficient(grid)),
    ):
        r, cg_ratio[name] = krylov_rows(
            name, ij.gallery.Poisson2D(jnp.asarray(k)), rounds
        )
        rows += r
    print(markdown(["system", "solver", "products", "rel. residual", "ms"], rows))
    print(
        "\niterjax CG / lineax CG wall time, at matched residual: "
        + ", ".join(f"{k} {v:.2f}x" for k, v in cg_ratio.items())
    )
    epsilons = (0.01,) if args.quick else (0.01, 0.001)
    points = 100 if args.quick else 200
    print(f"\n## Sinkhorn, {points} x {points} points, marginal error 1e-10\n")
    rows, ratios = sinkhorn_rows(points, epsilons, rounds)
    print(markdown(["epsilon", "solver", "iterations", "marginal error", "ms"], rows))
    print(
        "\nbest iterjax / best ott-jax wall time: "
        + ", ".join(f"eps {k:g}: {v:.2f}x" for k, v in ratios.items())
    )
    players = 100 if args.quick else 300
    densities = (1.0,) if args.quick else (1.0, 0.1, 0.05)
    print(f"\n## Bradley-Terry, {players} players, to a step of 1e-10\n")
    rows, ratios = bradley_terry_rows(players, densities, rounds)
    head = ["density", "method", "iterations", "max |s - s_choix ilsr|", "ms"]
    print(markdown(head, rows))
    print(
        "\nbest iterjax newman / choix ilsr wall time: "
        + ", ".join(f"density {k:g}: {v:.2f}x" for k, v in ratios.items())
    )


if __name__ == "__main__":
    main()
