"""Hypergradients side by side: iterjax, jaxopt (implicit_diff) and optimistix.

Every method computes ∇_θ f(w*(θ), θ) with w*(θ) = argmin_w g(w, θ) by implicit
differentiation of its own inner solver, jitted, in float64, on:

* ridge: per-feature ridge penalties on sklearn's diabetes (closed form);
* logreg_cancer: per-feature L2 penalties of logistic regression on breast_cancer
  (569 x 30);
* logreg_digits: per-feature L2 penalties of 10-class logistic regression on
  digits (1797 x 64, 640 weights).

The reference for logistic regression is Newton with the dense Hessian to machine
precision and the dense implicit formula. Reported: relative error of each
hypergradient against the reference, median time of the jitted call (round robin),
and the issue's ratio: the time of the fastest iterjax method at least as accurate
as the most accurate peer, over that peer's time. Inner tolerance:
|∇_w g|_2 <= 1e-10 for everyone (jaxopt's rule; iterjax gets `norm=two_norm`).

Run: make bench   (or: python benchmarks/bilevel.py [--rounds N])
"""

import argparse
import functools
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
from benchmarks._common import (  # noqa: E402
    TIME_COLUMNS,
    load,
    machine,
    markdown,
    time_cells,
)
from iterjax.diagnostics import timings  # noqa: E402

TOL = 1e-10


def _split(x, y, seed=0, frac=0.7):
    idx = np.random.default_rng(seed).permutation(len(x))
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    k = int(frac * len(x))
    return [jnp.asarray(a) for a in (x[idx[:k]], y[idx[:k]], x[idx[k:]], y[idx[k:]])]


def ridge():
    from sklearn.datasets import load_diabetes

    x, y = load_diabetes(return_X_y=True)
    X, Y, Xv, Yv = _split(x, (y - y.mean()) / y.std())
    n, nv = len(X), len(Xv)

    def inner(w, t):
        return jnp.sum((X @ w - Y) ** 2) / (2 * n) + 0.5 * jnp.sum(jnp.exp(t) * w**2)

    outer = lambda w, t: jnp.sum((Xv @ w - Yv) ** 2) / (2 * nv)
    return inner, outer, jnp.zeros(X.shape[1]), jnp.zeros(X.shape[1])


def logreg(name):
    from sklearn import datasets

    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    X, Y, Xv, Yv = _split(x.astype(np.float64), y)
    classes = int(y.max()) + 1
    onehot = lambda y: jax.nn.one_hot(y, classes, dtype=jnp.float64)

    def nll(w, X, Y):
        logits = X @ w
        return -jnp.mean(jnp.sum(onehot(Y) * jax.nn.log_softmax(logits), -1))

    def inner(w, t):
        return nll(w, X, Y) + 0.5 * jnp.sum(jnp.exp(t)[:, None] * w**2)

    outer = lambda w, t: nll(w, Xv, Yv)
    theta = jnp.full(X.shape[1], np.log(1e-2))
    return inner, outer, theta, jnp.zeros((X.shape[1], classes))


PROBLEMS = {
    "ridge": ridge,
    "logreg_cancer": functools.partial(logreg, "breast_cancer"),
    "logreg_digits": functools.partial(logreg, "digits"),
}


def reference(inner, outer, theta, w0):
    """Dense Newton to machine precision, then the dense implicit formula."""
    flat0, unravel = jax.flatten_util.ravel_pytree(w0)
    g = lambda v, t: inner(unravel(v), t)
    hess = jax.hessian(g)
    v = flat0
    for _ in range(30):
        v = v - jnp.linalg.solve(hess(v, theta), jax.grad(g)(v, theta))
    f_w = jax.grad(lambda v: outer(unravel(v), theta))(v)
    u = jnp.linalg.solve(hess(v, theta), f_w)
    mixed = jax.vjp(lambda t: jax.grad(g)(v, t), theta)[1](u)[0]
    f_t = jax.grad(lambda t: outer(unravel(v), t))(theta)
    return f_t - mixed


def methods(inner, outer, w0):
    import jaxopt
    import optimistix as optx

    def via_iterjax(t):
        w = ij.argmin(inner, w0, t, atol=TOL, norm=ij.two_norm).value
        return outer(w, t)

    def via_eisenstat_walker(t):  # the same, inner Newton-CG with adaptive forcing
        solver = ij.Newton(ij.CG(), forcing="eisenstat-walker")
        method = ij.bilevel.Implicit(
            ij.CG(rtol=1e-10), solver=solver, atol=TOL, norm=ij.two_norm
        )
        return ij.hypergradient(outer, inner, t, w0, method=method)

    def via_hypergradient(t):  # the implicit system to jaxopt's matched 1e-10
        method = ij.bilevel.Implicit(ij.CG(rtol=1e-10), atol=TOL, norm=ij.two_norm)
        return ij.hypergradient(outer, inner, t, w0, method=method)

    def via_jaxopt(solve):
        solver = jaxopt.LBFGS(
            fun=inner, tol=TOL, maxiter=2000, implicit_diff_solve=solve
        )
        return lambda t: outer(solver.run(w0, t).params, t)

    cg = functools.partial(jaxopt.linear_solve.solve_cg, tol=1e-10)

    def via_optimistix(t):
        solver = optx.BFGS(rtol=0.0, atol=TOL)
        sol = optx.minimise(inner, solver, w0, args=t, max_steps=2000, throw=False)
        return outer(sol.value, t)

    return {
        "iterjax argmin + jax.grad (defaults)": jax.jit(jax.grad(via_iterjax)),
        "iterjax hypergradient(Implicit(CG 1e-10))": jax.jit(via_hypergradient),
        "iterjax hypergradient(Implicit(CG 1e-10), Eisenstat-Walker)": jax.jit(
            via_eisenstat_walker
        ),
        "jaxopt LBFGS implicit_diff (default solve)": jax.jit(
            jax.grad(via_jaxopt(None))
        ),
        "jaxopt LBFGS implicit_diff (CG 1e-10)": jax.jit(jax.grad(via_jaxopt(cg))),
        "optimistix BFGS ImplicitAdjoint": jax.jit(jax.grad(via_optimistix)),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--problems", default=",".join(PROBLEMS))
    parser.add_argument("--out", default=str(pathlib.Path(__file__).parent / "results"))
    args = parser.parse_args()
    lines = [
        "# benchmarks/bilevel.py, float64",
        "",
        machine(),
        "",
        f"Inner tolerance {TOL:g}; time: the jitted hypergradient's median ms "
        f"[interquartile range] over {args.rounds} rounds, compile time apart.",
    ]
    for pname in args.problems.split(","):
        inner, outer, theta, w0 = PROBLEMS[pname]()
        ref = reference(inner, outer, theta, w0)
        ms = methods(inner, outer, w0)
        t = timings({k: (f, (theta,)) for k, f in ms.items()}, args.rounds)
        times = {k: v.median for k, v in t.items()}
        rows, errors = [], {}
        for name, f in ms.items():
            g = f(theta)
            errors[name] = float(jnp.linalg.norm(g - ref) / jnp.linalg.norm(ref))
            rows.append([name, f"{errors[name]:.1e}", *time_cells(t[name])])
        peer = min((k for k in ms if not k.startswith("iterjax")), key=errors.get)
        ours = min(
            (k for k in ms if k.startswith("iterjax") and errors[k] <= errors[peer]),
            key=times.get,
        )
        table = markdown(["method", "rel. error vs reference", *TIME_COLUMNS], rows)
        lines += [
            "",
            f"### {pname} (theta: {theta.size}, weights: {w0.size})",
            "",
            table,
            "",
            f"fastest iterjax at least as accurate as the most accurate peer "
            f"({ours}) / that peer ({peer}): **{times[ours] / times[peer]:.2f}x**",
        ]
        print("\n".join(lines[-6:]), flush=True)
    lines += ["", f"Load average (1/5/15 min) at the end: {load()}"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"bilevel_{jax.devices()[0].platform}.md"
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
