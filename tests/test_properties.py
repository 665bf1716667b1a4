"""Property-based differential tests of the stopping and acceptance rules.

Random dense inputs hide rule bugs: a rule that accepts a position behind a
predecessor that moved in the same sweep passes on them, and fails on impulses,
zero inputs (0 a fixed point of f), zero-diagonal Jacobians (permutations),
chaotic maps and expanding maps. hypothesis draws recurrences from those
families; every method must then satisfy the guarantee `iterjax.scan` states:

* converged within at most T sweeps (every sweep accepts a position);
* the returned carries' own residual, recomputed here, is within the tolerance;
* so their error is within the tolerance propagated through the recurrence
  (b_t = L_t b_{t-1} + tol, L_t a Lipschitz bound of the step in the max norm);
* with atol = 0, the carries equal lax.scan's bitwise (elementwise families);
* gradients are within the same kind of bound of lax.scan's;
* a NaN in the inputs gives NaN from there on and "not converged".

Every family runs through one compiled program per method (the family is a
`lax.switch` index and its parameters are traced), so the number of examples
costs run time, not compile time. The examples per test come from the
hypothesis profile (`HYPOTHESIS_PROFILE=deep` for many more; conftest.py).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import iterjax as ij

T, D = 12, 2
SWAP = jnp.array([[0.0, 1.0], [1.0, 0.0]])  # a permutation: zero diagonal
KINDS = ("tanh", "swap", "logistic", "product", "relu")

METHODS = {
    "jacobi": ij.Jacobi(),
    "jacobi-w4": ij.Jacobi(window=4),
    "gauss-seidel": ij.GaussSeidel(3),
    "picard": ij.sequence.Picard(),
    # A_t = diag(1, 0): increments on one coordinate, Jacobi on the other
    "picard-diagonal": ij.sequence.Picard(diagonal=jnp.array([1.0, 0.0])),
    "quasi-deer": ij.QuasiDEER(),
    "deer": ij.DEER(),
    "deer-w5": ij.DEER(window=5),
    "elk": ij.ELK(),
    "quasi-elk": ij.QuasiELK(sigmasq=10.0),
}


def step(h, x, p):
    """One step of the family p["kind"]: f(h, x) -> (h', h')."""
    W, c = p["W"], p["c"]
    branches = [
        lambda: jnp.tanh(W @ h + x),
        lambda: c * (SWAP @ h) + x,
        lambda: c * h * (1 - h) + 0 * x,  # chaotic at c ~ 3.9, h in (0, 1)
        lambda: h * x,
        # (off the kink at h = x = 0, where a subgradient is a convention)
        lambda: jax.nn.relu(W @ h + x + 0.05) - 0.3 * h,
    ]
    new = jax.lax.switch(p["kind"], branches)
    return new, new


def lipschitz(p, xs):
    """Per-step bounds L_t of |f(h) - f(h')| / |h - h'| in the max norm."""
    W, c, kind = np.asarray(p["W"]), float(p["c"]), int(p["kind"])
    rows = np.abs(W).sum(1).max()
    per_kind = [rows, abs(c), abs(c), None, rows + 0.3]
    if KINDS[kind] == "product":
        return np.abs(np.asarray(xs)).max(1)
    return np.full(T, per_kind[kind])


@st.composite
def problems(draw):
    """(params, h0, xs) of a family, with inputs that hide rule bugs."""
    kind = draw(st.integers(0, len(KINDS) - 1))
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    scale = draw(st.sampled_from([0.3, 0.9, 1.3]))
    W = rng.normal(size=(D, D))
    W = scale * W / np.abs(np.linalg.eigvals(W)).max()
    c = {
        "swap": draw(st.sampled_from([0.5, 0.9, 1.2])),
        "logistic": draw(st.floats(3.5, 4.0)),
    }.get(KINDS[kind], 1.0)
    inputs = draw(st.sampled_from(["impulse", "zeros", "sparse", "dense"]))
    xs = np.zeros((T, D))
    if inputs == "impulse":
        xs[draw(st.integers(0, T - 1))] = rng.choice([-1.0, 1.0], D)
    elif inputs == "sparse":
        xs[rng.random(T) < 0.25] = rng.normal(size=D)
    elif inputs == "dense":
        xs = rng.normal(size=(T, D))
    h0 = np.zeros(D)
    if KINDS[kind] == "logistic":
        h0 = rng.uniform(0.05, 0.95, D)
    elif KINDS[kind] == "product":
        xs = np.where(xs == 0, 1.0, np.abs(xs) + 0.5)  # sign-free, around 1
        h0 = np.ones(D)
    p = {"kind": kind, "W": jnp.asarray(W), "c": jnp.asarray(c)}
    return p, jnp.asarray(h0), jnp.asarray(xs)


@functools.cache
def solver(name, atol):
    method = METHODS[name]

    @jax.jit
    def solve(p, h0, xs):
        f = lambda h, x: step(h, x, p)
        return ij.scan(f, h0, xs, method=method, atol=atol, return_stats=True)

    return solve


def reference(p, h0, xs):
    return jax.lax.scan(lambda h, x: step(h, x, p), h0, xs)


def propagated(L, tol):
    """b_t = L_t b_{t-1} + tol_t from b_0 = 0: the error bound of a trajectory
    whose per-step residuals are within tol_t."""
    b, out = 0.0, []
    for Lt, tt in zip(L, tol, strict=True):
        b = Lt * b + tt
        out.append(b)
    return np.array(out)


@pytest.mark.parametrize("name", METHODS)
@given(problem=problems())
def test_converged_means_within_the_stated_bound_of_lax_scan(name, problem):
    p, h0, xs = problem
    atol = 1e-8
    _, ys, stats = solver(name, atol)(p, h0, xs)
    _, ref = reference(p, h0, xs)
    assert bool(stats.converged), stats
    assert 1 <= int(stats.num_sweeps) <= T + 1
    # the returned trajectory's own residual, recomputed here
    prev = jnp.concatenate([h0[None], ys[:-1]])
    f = jax.vmap(lambda h, x: step(h, x, p)[0])
    residual = np.abs(np.asarray(f(prev, xs) - ys)).max(1)
    assert residual.max() <= atol * (1 + 1e-6) + 1e-15, residual
    # so its error is within the tolerance propagated through the recurrence
    bound = propagated(lipschitz(p, xs), np.full(T, atol))
    error = np.abs(np.asarray(ys - ref)).max(1)
    assert np.all(error <= bound * (1 + 1e-6) + 1e-14), (error, bound)


@pytest.mark.parametrize("name", ["jacobi", "gauss-seidel", "picard", "deer"])
@given(problem=problems())
def test_atol_zero_is_lax_scan_bitwise(name, problem):
    p, h0, xs = problem
    if KINDS[int(p["kind"])] not in ("swap", "logistic", "product"):
        return  # elementwise steps: a batch of t rounds as one t does
    _, ys, stats = solver(name, 0.0)(p, h0, xs)
    assert bool(stats.converged) and int(stats.num_sweeps) <= T + 1
    np.testing.assert_array_equal(ys, reference(p, h0, xs)[1])


@functools.cache
def gradient(name):
    method = METHODS[name]
    w = jnp.array([0.7, -1.3])

    def loss(xs, p, h0, parallel):
        f = lambda h, x: step(h, x, p)
        if parallel:
            last = ij.scan(f, h0, xs, method=method, atol=1e-10)[0]
        else:
            last = jax.lax.scan(f, h0, xs)[0]
        return jnp.dot(w, last)

    grad = jax.grad(loss)
    return jax.jit(functools.partial(grad, parallel=True)), jax.jit(
        functools.partial(grad, parallel=False)
    )


@pytest.mark.parametrize("name", ["jacobi", "quasi-deer", "deer", "elk"])
@given(problem=problems())
def test_gradients_are_lax_scans_within_the_bound(name, problem):
    # the tangent and adjoint sweeps use the same acceptance rule; an impulse
    # cotangent (the loss reads the last carry) is what broke it
    p, h0, xs = problem
    parallel, sequential = gradient(name)
    g, ref = parallel(xs, p, h0), sequential(xs, p, h0)
    L = np.maximum(lipschitz(p, xs), 1.0)
    amplification = float(np.prod(L)) * T
    scale = 1.0 + float(jnp.max(jnp.abs(ref)))
    err = float(jnp.max(jnp.abs(g - ref)))
    assert err <= 1e-8 * amplification * scale, (err, scale, amplification)


@pytest.mark.parametrize("name", ["jacobi", "picard", "deer", "quasi-elk"])
@given(
    problem=problems(),
    at=st.integers(0, T - 1),
    value=st.sampled_from([np.nan, np.inf]),
)
def test_a_non_finite_input_is_non_finite_from_there_on(name, problem, at, value):
    p, h0, xs = problem
    xs = xs.at[at].set(value)
    _, ys, stats = solver(name, 1e-8)(p, h0, xs)
    _, ref = reference(p, h0, xs)
    bad = ~np.all(np.isfinite(np.asarray(ref)), axis=1)
    if not bad.any():  # (tanh(inf) is finite: then lax.scan's result is too)
        return
    # from lax.scan's first non-finite state on: never a finite guess
    assert not bool(stats.converged) and int(stats.result) == 2
    first = int(np.argmax(bad))
    np.testing.assert_array_equal(np.isfinite(ys[:first]), np.isfinite(ref[:first]))
    assert not np.any(np.all(np.isfinite(np.asarray(ys[first:])), axis=1))


# ------------------------------------------------ fixed points: the same rule


@st.composite
def maps(draw):
    """(W, a, kind) of y -> tanh(W y + a) or y -> W y + a, W contractive or not,
    dense or a scaled permutation (zero diagonal); a may hold a NaN."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    n = 5
    if draw(st.booleans()):
        W = rng.normal(size=(n, n))
    else:
        W = np.eye(n)[rng.permutation(n)]
    W = draw(st.sampled_from([0.5, 0.95, 1.5])) * W / np.abs(np.linalg.eigvals(W)).max()
    a = draw(st.sampled_from(["dense", "impulse", "zero", "nan"]))
    a = {"dense": rng.normal(size=n), "zero": np.zeros(n)}.get(a, np.eye(n)[0])
    if draw(st.booleans()) and a[0] == 1 and a.sum() == 1:
        a = np.where(np.arange(n) == 2, np.nan, a)  # a NaN parameter
    return jnp.asarray(W), jnp.asarray(a), draw(st.integers(0, 1))


def fixed_point_map(y, args):
    W, a, kind = args
    return jnp.where(kind == 0, jnp.tanh(W @ y + a), W @ y + a)


@functools.cache
def fixed_point_solver(name):
    from helpers import ALL_SOLVERS, IDS

    solvers = {
        **dict(zip(IDS, ALL_SOLVERS, strict=True)),
        "nesterov": ij.Momentum(nesterov=True),
        "nag-gs": ij.NAGGS(),
        "async": ij.AsyncCoordinates(fraction=0.5, delay=2),
        # the Armijo rule on |r|: a NaN trial fails it (shrinks the step)
        "backtracking-newton": ij.Backtracking(ij.Newton()),
    }
    solver = solvers[name]
    run = lambda args: ij.fixed_point(
        fixed_point_map, jnp.zeros(5), args, solver=solver, atol=1e-9, max_steps=200
    )
    return jax.jit(run)


@pytest.mark.parametrize(
    "name",
    [
        "picard",
        "anderson",
        "broyden",
        "newton",
        "safeguarded-broyden",
        "momentum",
        "nesterov",
        "async",
        "nag-gs",
        "backtracking-newton",
    ],
)
@given(problem=maps())
def test_fixed_point_converged_means_the_true_residual_is_within_atol(name, problem):
    sol = fixed_point_solver(name)(problem)
    if int(sol.result) == 2:  # stopped on a non-finite residual: NaN out
        assert bool(jnp.all(jnp.isnan(sol.value))), sol.value
    if not bool(jnp.all(jnp.isfinite(problem[1]))):  # NaN in: never converged
        assert not bool(sol.converged)
        return
    if bool(sol.converged):
        residual = jnp.max(jnp.abs(fixed_point_map(sol.value, problem) - sol.value))
        assert float(residual) <= 1e-9 * (1 + 1e-6), float(residual)


# ------------------------------------------- argmin: non-convex losses, any start

NC = 4
_rng = np.random.default_rng(7)
NC_A = jnp.asarray(_rng.normal(size=(6, NC)))
NC_C = jnp.asarray(_rng.uniform(-0.9, 0.9, size=6))
NONCONVEX = ("wells", "rosenbrock", "tanh", "coupled", "barrier")


def _wells(w, P):
    return jnp.sum((w**2 - 1) ** 2)


def _rosenbrock(w, P):
    return jnp.sum(100 * (w[1:] - w[:-1] ** 2) ** 2 + (1 - w[:-1]) ** 2)


def _tanh(w, P):  # a one-layer regression: non-convex in w
    return jnp.sum((jnp.tanh(NC_A @ w) - NC_C) ** 2) + 1e-2 * jnp.sum(w**2)


def _coupled(w, P):  # pairs w_i w_π(i): a zero-diagonal, indefinite Hessian at 0
    return jnp.sum((w * (P @ w) - 1) ** 2) + 0.1 * jnp.sum(w**2)


def _barrier(w, P):  # NaN outside |w| < 1: full Newton steps may leave the domain
    return jnp.sum((w**2 - 0.25) ** 2) - 0.1 * jnp.sum(jnp.log1p(-(w**2)))


def nonconvex_loss(w, theta):
    kind, tilt, P = theta
    branches = [_wells, _rosenbrock, _tanh, _coupled, _barrier]
    return jax.lax.switch(kind, branches, w, P) + jnp.dot(tilt, w)


@st.composite
def nonconvex_problems(draw):
    """(w0, (kind, tilt, P)): a non-convex loss of NONCONVEX plus a linear tilt
    (dense, an impulse, zero, NaN or inf), from a random start, zero (a
    stationary point of several: a maximum of the wells) or all ones; P a
    permutation."""
    rng = np.random.default_rng(draw(st.integers(0, 2**31)))
    kind = draw(st.sampled_from(range(len(NONCONVEX))))
    tilt = draw(st.sampled_from(["dense", "impulse", "zero", "nan", "inf"]))
    t = {"dense": 0.3 * rng.normal(size=NC), "zero": np.zeros(NC)}.get(
        tilt, np.eye(NC)[0]
    )
    t = {"nan": np.where(t == 1, np.nan, t), "inf": np.where(t == 1, np.inf, t)}.get(
        tilt, t
    )
    start = draw(st.sampled_from(["random", "zero", "ones"]))
    w0 = {"random": rng.normal(size=NC), "zero": np.zeros(NC)}.get(start, np.ones(NC))
    if NONCONVEX[kind] == "barrier":
        w0 = 0.9 * np.tanh(w0)  # inside the domain
    P = np.eye(NC)[rng.permutation(NC)]
    return jnp.asarray(w0), (jnp.int32(kind), jnp.asarray(t), jnp.asarray(P))


nonconvex_grad = jax.jit(jax.grad(nonconvex_loss))
nonconvex_hessian = jax.jit(jax.hessian(nonconvex_loss))

NC_SOLVERS = {
    "default": lambda theta: None,  # line-search Newton-CG (truncated CG)
    # plain CG's NaN on negative curvature: the search turns to a gradient step
    "nan-cg": lambda theta: ij.Backtracking(
        ij.Newton(ij.CG(), forcing="superlinear"),
        objective=lambda w: nonconvex_loss(w, theta),
    ),
}


@functools.cache
def nonconvex_solve(name):
    def run(w0, theta):
        solver = NC_SOLVERS[name](theta)
        return ij.argmin(nonconvex_loss, w0, theta, solver=solver, atol=1e-9)

    return jax.jit(run)


@pytest.mark.parametrize("name", NC_SOLVERS)
@given(problem=nonconvex_problems())
def test_argmin_on_non_convex_losses_converges_to_a_true_local_minimum(name, problem):
    """converged => |∇g|∞ <= atol recomputed, and the dense Hessian there is
    positive semi-definite (a local minimum, within Newton's reach of the dense
    reference); NaN in => NaN out; and from any start, with finite inputs, it
    converges (where plain Newton-CG broke down) or says that it stopped at a
    stationary point that is no minimum (result 5: a start on one, or a
    saddle whose descending directions the iterates never leave, e.g. the
    wells tilted along e₀ from 0: Newton-CG's Krylov spaces stay in span(e₀))."""
    w0, theta = problem
    sol = nonconvex_solve(name)(w0, theta)
    grad = nonconvex_grad
    if not bool(jnp.all(jnp.isfinite(theta[1]))):  # NaN / inf in: NaN out
        assert not bool(sol.converged) and bool(jnp.all(jnp.isnan(sol.value)))
        return
    saddle = int(sol.result) == 5
    assert bool(sol.converged) or saddle, (sol.result, sol.value)
    if bool(sol.converged):
        w = sol.value
        assert float(jnp.max(jnp.abs(grad(w, theta)))) <= 1e-9 * (1 + 1e-6)
        H = nonconvex_hessian(w, theta)
        eigs = np.linalg.eigvalsh(H)
        assert float(eigs[0]) >= -1e-6 * float(np.max(np.abs(eigs))), eigs
        # the dense Newton reference from w*: within atol / λ_min of it
        ref = w - np.linalg.solve(H, grad(w, theta))
        bound = NC * 1e-9 / max(float(eigs[0]), 1e-300)
        assert float(np.max(np.abs(w - ref))) <= bound + 1e-12
    else:  # a stationary point that is no minimum: the Hessian says so too
        eigs = np.linalg.eigvalsh(nonconvex_hessian(sol.value, theta))
        assert float(eigs[0]) < 0, eigs
