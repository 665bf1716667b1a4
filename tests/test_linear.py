"""Preconditioned Krylov solvers: the plain solve's solution in fewer products;
inside the implicit adjoint, Newton and argmin; bad input."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import iterjax as ij
import iterjax.linear as iterjax_linear
from iterjax.linear import (
    ChebyshevPreconditioner,
    FunctionPreconditioner,
    JacobiPreconditioner,
    Multigrid,
    MultigridSolver,
    Stencil,
)
from iterjax.linear.krylov import arnoldi, hessenberg_lstsq
from iterjax.linear.preconditioners import lanczos_bounds


def poisson_1d(n=200, decades=9.0):
    """-(k u')' on n points with a coefficient k spanning `decades` e-folds: SPD
    and ill-conditioned (cond ~ 5e6 at the defaults)."""
    k = jnp.exp(jnp.linspace(0, decades, n + 1)) * (
        1 + 0.5 * jnp.sin(jnp.arange(n + 1))
    )

    def matvec(u):
        up = jnp.concatenate([u[1:], jnp.zeros(1)])
        um = jnp.concatenate([jnp.zeros(1), u[:-1]])
        return (k[:-1] + k[1:]) * u - k[1:] * up - k[:-1] * um

    return matvec, jnp.ones(n), jax.vmap(matvec)(jnp.eye(n)).T


def test_preconditioners_same_solution_fewer_products():
    matvec, b, a = poisson_1d()
    exact = jnp.linalg.solve(a, b)
    solve = lambda p: ij.CG(rtol=1e-12, max_steps=20000, preconditioner=p)
    x, plain = solve(None).solve_with_stats(matvec, b)
    assert bool(plain.converged)
    np.testing.assert_allclose(x, exact, rtol=1e-10, atol=0)
    diag = jnp.diag(a)
    for p in [
        JacobiPreconditioner(),
        JacobiPreconditioner(probes=4),
        lambda r: r / diag,  # a user's function (learned-preconditioner hook)
    ]:
        x, stats = solve(p).solve_with_stats(matvec, b)
        assert bool(stats.converged), p
        np.testing.assert_allclose(x, exact, rtol=1e-10, atol=0)
        assert int(stats.num_matvecs) < int(plain.num_matvecs), p
    # Chebyshev: fewer CG steps, each k + 1 products; not fewer products in all
    # (CG is optimal in its Krylov space), as its docstring says.
    k = 4
    x, stats = solve(ChebyshevPreconditioner(k)).solve_with_stats(matvec, b)
    np.testing.assert_allclose(x, exact, rtol=1e-10, atol=0)
    steps = (int(stats.num_matvecs) - 12 - k) // (k + 1)
    assert steps < int(plain.num_matvecs) / 2


def test_lanczos_bounds_bracket_the_spectrum_from_inside():
    matvec, b, a = poisson_1d(n=60, decades=3.0)
    eig = jnp.linalg.eigvalsh(a)
    lo, hi = lanczos_bounds(matvec, b, 40)
    assert eig[0] <= lo < hi <= eig[-1] * (1 + 1e-12)
    np.testing.assert_allclose(hi, eig[-1], rtol=1e-3)


def test_gmres_and_bicgstab_take_preconditioners():
    matvec, b, a = poisson_1d()
    exact = jnp.linalg.solve(a, b)
    plain = ij.GMRES(rtol=1e-12).solve(matvec, b)  # restarted GMRES stagnates here
    assert float(jnp.max(jnp.abs(plain - exact))) > 1e-3 * float(jnp.max(exact))
    for solver in [ij.GMRES, ij.BiCGStab]:
        x = solver(rtol=1e-12, preconditioner=JacobiPreconditioner()).solve(matvec, b)
        np.testing.assert_allclose(x, exact, rtol=1e-8)


def test_preconditioned_solvers_inside_adjoint_newton_and_argmin():
    fn = lambda y, a: 0.5 * jnp.tanh(a * y) + 0.1 * y + 1.0
    y0 = jnp.zeros(5)
    a = jnp.linspace(0.5, 1.5, 5)
    pre = JacobiPreconditioner()
    loss = lambda a, adjoint: jnp.sum(ij.fixed_point(fn, y0, a, adjoint=adjoint).value)
    plain = jax.grad(loss)(a, ij.ImplicitAdjoint(ij.GMRES(rtol=1e-12)))
    pcg = jax.grad(loss)(
        a, ij.ImplicitAdjoint(ij.GMRES(rtol=1e-12, preconditioner=pre))
    )
    np.testing.assert_allclose(pcg, plain, rtol=1e-9)
    newton = ij.Newton(ij.GMRES(rtol=1e-12, preconditioner=pre))
    sol = ij.fixed_point(fn, y0, a, solver=newton, atol=1e-12)
    assert bool(sol.converged)
    inner = lambda w, th: 0.5 * jnp.sum(th * w**2) - jnp.sum(w)
    w = ij.argmin(
        inner, jnp.zeros(5), a, solver=ij.Newton(ij.CG(preconditioner=pre)), atol=1e-12
    )
    np.testing.assert_allclose(w.value, 1 / a, rtol=1e-10)


def test_jacobi_reads_the_diagonal_of_an_operator_that_has_one():
    k = jnp.asarray(ij.gallery.lognormal_coefficient(15, seed=3))
    op, b = ij.gallery.Poisson2D(k), jnp.ones((15, 15))
    apply, cost, _ = JacobiPreconditioner().build(op, b)
    probed, probes, _ = JacobiPreconditioner().build(lambda u: op(u), b)
    assert (cost, probes) == (0, 225)
    np.testing.assert_allclose(apply(b), 1 / op.diagonal(), rtol=1e-14)
    np.testing.assert_allclose(apply(b), probed(b), rtol=1e-12)
    x, stats = ij.CG(
        rtol=1e-10, preconditioner=JacobiPreconditioner()
    ).solve_with_stats(op, b)
    assert bool(stats.converged) and int(stats.num_matvecs) < 225
    assert float(jnp.linalg.norm(b - op(x))) <= 1e-10 * float(jnp.linalg.norm(b))


def test_preconditioned_cg_under_jit_and_vmap():
    matvec, b, _ = poisson_1d(n=50, decades=3.0)
    solve = ij.CG(rtol=1e-12, preconditioner=JacobiPreconditioner())
    bs = jnp.stack([b, 2 * b, jnp.arange(50.0)])
    xs = jax.jit(jax.vmap(lambda b: solve.solve(matvec, b)))(bs)
    for i in range(3):
        np.testing.assert_allclose(xs[i], solve.solve(matvec, bs[i]), rtol=1e-12)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ij.CG(preconditioner="jacobi"), TypeError, "preconditioner"),
        (lambda: JacobiPreconditioner(probes=0), ValueError, "probes"),
        (lambda: ChebyshevPreconditioner(0), ValueError, "degree"),
        (lambda: ChebyshevPreconditioner(margin=0.5), ValueError, "margin"),
    ],
)
def test_bad_preconditioners(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_function_preconditioner_is_hashable():
    # solvers are static hyperparameters of adjoints: they must hash
    f = lambda r: r
    assert hash(ij.CG(preconditioner=FunctionPreconditioner(f))) == hash(
        ij.CG(preconditioner=FunctionPreconditioner(f))
    )


# --- Stationary iterations: SOR / SSOR on a matrix and on a matrix-free stencil.


def _model_poisson(n=8):
    pois = ij.gallery.Poisson2D(jnp.ones((n, n)))
    a = jax.jacfwd(lambda v: pois(v.reshape(n, n)).ravel())(jnp.zeros(n * n))
    return pois, iterjax_linear.MatrixOperator(a), a


def _spectral_radius(solver, operator, shape):
    step = solver.iteration(operator, jnp.zeros(shape))
    size = int(np.prod(shape))
    m = jax.jacfwd(lambda v: step(v.reshape(shape), None).ravel())(jnp.zeros(size))
    return float(jnp.max(jnp.abs(jnp.linalg.eigvals(m))))


@pytest.mark.parametrize("operator", ["stencil", "matrix"])
def test_sor_spectral_radius_matches_youngs_theory(operator):
    n = 8
    pois, mat, _ = _model_poisson(n)
    op, shape = (pois, (n, n)) if operator == "stencil" else (mat, (n * n,))
    rho_jacobi = np.cos(np.pi / (n + 1))
    omega = float(iterjax_linear.optimal_omega(rho_jacobi))
    # Gauss-Seidel: ρ_J²; the optimal ω*: ω* - 1 (red-black and natural order
    # are both consistently ordered; the optimum is a 2x2 Jordan block, hence 1e-7)
    gs = _spectral_radius(iterjax_linear.SOR(1.0), op, shape)
    np.testing.assert_allclose(gs, rho_jacobi**2, rtol=1e-10)
    best = _spectral_radius(iterjax_linear.SOR(omega), op, shape)
    np.testing.assert_allclose(best, omega - 1, rtol=1e-6)


def test_sor_solves_poisson_and_the_optimal_omega_is_fastest():
    n = 8
    pois, mat, a = _model_poisson(n)
    b = jnp.ones((n, n))
    exact = jnp.linalg.solve(a, b.ravel())
    omega = float(iterjax_linear.optimal_omega(np.cos(np.pi / (n + 1))))
    steps = {}
    for name, solver in [
        ("gs", iterjax_linear.SOR(1.0)),
        ("sor*", iterjax_linear.SOR(omega)),
        ("ssor", iterjax_linear.SOR(1.2, symmetric=True)),
    ]:
        sol = solver.solve(pois, b)
        assert bool(sol.converged), name
        np.testing.assert_allclose(sol.value.ravel(), exact, atol=1e-8)
        steps[name] = int(sol.num_steps)
    dense = iterjax_linear.SOR(omega).solve(mat, b.ravel())
    np.testing.assert_allclose(dense.value, exact, atol=1e-8)
    assert steps["sor*"] < steps["gs"] / 3, steps
    # vmap over ω (a float leaf): per-lane step counts
    omegas = jnp.array([1.0, omega, 1.9])
    out = jax.jit(jax.vmap(lambda w: iterjax_linear.SOR(w).solve(pois, b)))(omegas)
    assert bool(jnp.all(out.converged))
    assert int(out.num_steps[1]) == min(out.num_steps.tolist())


def test_sor_bad_input():
    with pytest.raises(ValueError, match="omega"):
        iterjax_linear.SOR(2.0)
    with pytest.raises(ValueError, match="omega"):
        iterjax_linear.SOR(-0.5)
    with pytest.raises(TypeError, match="splitting"):
        iterjax_linear.SOR(1.0).solve(lambda x: x, jnp.ones(3))


# --- Chebyshev semi-iteration.


def _poisson_bounds(n):
    h = 1.0 / (n + 1)
    return 8 / h**2 * np.sin(np.pi * h / 2) ** 2, 8 / h**2 * np.cos(np.pi * h / 2) ** 2


def test_chebyshev_attains_its_worst_case_rate_with_exact_bounds():
    n = 12
    pois, _, a = _model_poisson(n)
    b = jax.random.normal(jax.random.PRNGKey(0), (n, n))
    lo, hi = _poisson_bounds(n)
    np.testing.assert_allclose(jnp.linalg.eigvalsh(a)[jnp.array([0, -1])], [lo, hi])
    rtol = 1e-10
    x, stats = iterjax_linear.Chebyshev(bounds=(lo, hi), rtol=rtol).solve_with_stats(
        pois, b
    )
    assert bool(stats.converged)
    exact = jnp.linalg.solve(a, b.ravel()).reshape(n, n)
    np.testing.assert_allclose(x, exact, atol=1e-9 * float(jnp.max(jnp.abs(exact))))
    # |r_k| <= 2 q^k / (1 + q^2k) |b|: the steps are at most the bound's, and a
    # random b (all eigencomponents present) needs nearly all of them
    q = (np.sqrt(hi / lo) - 1) / (np.sqrt(hi / lo) + 1)
    bound = np.log(2 / rtol) / np.log(1 / q)
    steps = int(stats.num_matvecs) - 1
    assert 0.8 * bound <= steps <= np.ceil(bound) + 1, (steps, bound)


def test_chebyshev_with_lanczos_bounds_under_jit_vmap_and_as_adjoint_solver():
    matvec, b, dense = poisson_1d(n=40, decades=3.0)
    solver = iterjax_linear.Chebyshev(rtol=1e-11)
    bs = jnp.stack([b, jnp.arange(40.0)])
    xs = jax.jit(jax.vmap(lambda b: solver.solve(matvec, b)))(bs)
    for i in range(2):
        np.testing.assert_allclose(
            xs[i], jnp.linalg.solve(dense, bs[i]), rtol=1e-8, atol=1e-12
        )
    # the Hessian system of argmin's implicit gradient (SPD)
    inner = lambda w, th: (
        0.5 * w @ (dense @ w) * th + jnp.sum(jnp.logaddexp(w, -w)) - jnp.sum(w)
    )
    outer = lambda th, adjoint: jnp.sum(
        ij.argmin(inner, jnp.zeros(40), th, atol=1e-12, adjoint=adjoint).value ** 2
    )
    cheb = jax.grad(outer)(1.0, ij.ImplicitAdjoint(solver))
    cg = jax.grad(outer)(1.0, ij.ImplicitAdjoint(ij.CG(rtol=1e-12)))
    np.testing.assert_allclose(cheb, cg, rtol=1e-7)


def test_chebyshev_diverges_visibly_when_the_bounds_miss_the_spectrum():
    n = 8
    pois, _, _ = _model_poisson(n)
    lo, hi = _poisson_bounds(n)
    short = iterjax_linear.Chebyshev(bounds=(lo, 0.5 * hi), rtol=1e-10, max_steps=300)
    _, stats = short.solve_with_stats(pois, jnp.ones((n, n)))
    assert not bool(stats.converged)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"bounds": (0.0, 1.0)}, "bounds"),
        ({"bounds": (2.0, 1.0)}, "bounds"),
        ({"lanczos_steps": 1}, "lanczos_steps"),
        ({"margin": 0.9}, "margin"),
    ],
)
def test_chebyshev_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        iterjax_linear.Chebyshev(**kwargs)


# --- Krylov recycling.


def _darcy_sequence(n=12, count=12, seed=0):
    rng = np.random.default_rng(seed)
    g = rng.normal(size=(2, n, n))
    params = rng.uniform(-1, 1, (count, 2))
    ks = np.exp(np.einsum("sc,cij->sij", params, g) * 0.7)
    return jnp.asarray(ks), params


def _poisson_mv(k, x):
    return ij.gallery.Poisson2D(k)(x)


@pytest.mark.parametrize("warm_start", [True, False])
def test_recycled_cg_gives_independent_cgs_solutions_in_fewer_products(warm_start):
    ks, params = _darcy_sequence()
    order = np.asarray(iterjax_linear.similarity_order(params))
    ks = ks[order]
    bs = jnp.asarray(np.random.default_rng(1).normal(size=ks.shape))
    solver = iterjax_linear.RecycledCG(6, 12, rtol=1e-11, warm_start=warm_start)
    xs, stats = jax.jit(
        lambda ks, bs: iterjax_linear.solve_sequence(solver, _poisson_mv, ks, bs)
    )(ks, bs)
    assert bool(jnp.all(stats.converged))
    plain = jax.vmap(
        lambda k, b: ij.CG(rtol=1e-11).solve_with_stats(lambda v: _poisson_mv(k, v), b)
    )(ks, bs)
    scale = float(jnp.max(jnp.abs(plain[0])))
    np.testing.assert_allclose(xs, plain[0], atol=1e-8 * scale)
    # the first system is plain CG (+ the products of the empty subspace's
    # bookkeeping); later ones need fewer
    assert int(stats.num_matvecs[1:].sum()) < int(plain[1].num_matvecs[1:].sum())


def test_recycled_cg_with_the_exact_eigenvectors_deflates_them():
    # With U = the k lowest eigenvectors, CG runs on the rest of the spectrum:
    # its steps drop as the condition number λ_max / λ_{k+1} says.
    n = 10
    k = jnp.ones((n, n))
    a = jax.vmap(lambda v: _poisson_mv(k, v.reshape(n, n)).ravel())(jnp.eye(n * n)).T
    w, v = np.linalg.eigh(np.asarray(a))
    b = jnp.asarray(np.random.default_rng(0).normal(size=(n, n)))
    solver = iterjax_linear.RecycledCG(8, 8, rtol=1e-10, warm_start=False)
    state = iterjax_linear.RecycleState(
        jnp.asarray(v[:, :8]), jnp.bool_(True), jnp.zeros(n * n)
    )
    x, stats, _ = solver.solve(lambda u: _poisson_mv(k, u), b, state)
    np.testing.assert_allclose(x.ravel(), np.linalg.solve(a, b.ravel()), atol=1e-9)
    steps = int(stats.num_matvecs) - 8 - 1
    q = lambda kappa: (np.sqrt(kappa) - 1) / (np.sqrt(kappa) + 1)
    bound = np.log(2 / 1e-10 * np.sqrt(w[-1] / w[8])) / np.log(1 / q(w[-1] / w[8]))
    plain = int(
        ij.CG(rtol=1e-10)
        .solve_with_stats(lambda u: _poisson_mv(k, u), b)[1]
        .num_matvecs
    )
    assert steps <= bound < plain


def test_similarity_order_walks_to_nearest_neighbours():
    points = jnp.array([[0.0], [5.0], [1.0], [3.0], [2.0], [4.0]])
    np.testing.assert_array_equal(
        iterjax_linear.similarity_order(points), [0, 2, 4, 3, 5, 1]
    )


def test_recycled_cg_bad_hyperparameters():
    with pytest.raises(ValueError, match="stored"):
        iterjax_linear.RecycledCG(subspace=10, stored=5)
    with pytest.raises(ValueError, match="subspace"):
        iterjax_linear.RecycledCG(subspace=0)


# --- GCRO-DR: recycling for non-symmetric systems.


def _convection_diffusion(c, u):
    """-Δu + c · ∇u on the unit square's interior grid (central differences)."""
    g = u.shape[0]
    h = 1.0 / (g + 1)
    p = jnp.pad(u, 1)
    lap = 4 * u - p[:-2, 1:-1] - p[2:, 1:-1] - p[1:-1, :-2] - p[1:-1, 2:]
    dx, dy = p[2:, 1:-1] - p[:-2, 1:-1], p[1:-1, 2:] - p[1:-1, :-2]
    return lap / h**2 + (c[0] * dx + c[1] * dy) / (2 * h)


def _dense(c, g):
    basis = jnp.eye(g * g).reshape(-1, g, g)
    return jax.vmap(lambda e: _convection_diffusion(c, e).ravel())(basis).T


def _convection_sequence(count=8, g=14):
    t = jnp.linspace(0.0, 1.0, count)
    cs = jnp.stack([2 + 3 * t, 1 + 2 * t], axis=1)
    bs = jnp.asarray(np.random.default_rng(0).normal(size=(count, g, g)))
    return cs, bs


def test_gcrodr_solves_a_nonsymmetric_sequence_in_fewer_products():
    cs, bs = _convection_sequence()
    solver = iterjax_linear.GCRODR(5, 20, rtol=1e-10, warm_start=False)
    xs, stats = jax.jit(
        lambda cs, bs: iterjax_linear.solve_sequence(
            solver, _convection_diffusion, cs, bs
        )
    )(cs, bs)
    assert bool(jnp.all(stats.converged)) and not bool(jnp.any(stats.breakdown))
    for c, b, x in zip(cs, bs, xs):
        want = np.linalg.solve(np.asarray(_dense(c, 14)), np.asarray(b).ravel())
        np.testing.assert_allclose(np.asarray(x).ravel(), want, atol=1e-8)
    # each system solved alone: the same solver from an empty subspace
    alone = jax.vmap(
        lambda c, b: (
            solver.solve(lambda v: _convection_diffusion(c, v), b, solver.init(b))[
                1
            ].num_matvecs
        )
    )(cs, bs)
    assert int(stats.num_matvecs[0]) == int(alone[0])
    assert int(stats.num_matvecs[1:].sum()) < 0.9 * int(alone[1:].sum())  # 0.78


def test_gcrodr_first_cycle_is_restarted_gmres():
    # From an empty subspace, one cycle is GMRES(m - k) from x = 0: scipy's.
    scipy_gmres = pytest.importorskip("scipy.sparse.linalg").gmres
    c, b = jnp.array([3.0, 1.0]), _convection_sequence()[1][0]
    solver = iterjax_linear.GCRODR(4, 12, rtol=1e-14, max_cycles=1)
    x, stats, state = solver.solve(
        lambda v: _convection_diffusion(c, v), b, solver.init(b)
    )
    a = np.asarray(_dense(c, 14))
    want = scipy_gmres(a, np.asarray(b).ravel(), restart=8, maxiter=1, rtol=1e-14)[0]
    np.testing.assert_allclose(np.asarray(x).ravel(), want, rtol=1e-9, atol=1e-12)
    assert not bool(stats.converged) and int(stats.num_matvecs) == 4 + 1 + 8
    # the subspace it leaves satisfies A U = C for this A: a next solve of the
    # same system recycles it (k products to re-establish, fewer cycles)
    assert bool(state.ready)


def test_gmres_counts_its_products_and_its_cycles_are_scipys():
    scipy_gmres = pytest.importorskip("scipy.sparse.linalg").gmres
    cs, bs = _convection_sequence(count=3)
    a = np.asarray(_dense(cs[0], 14))
    matvec = lambda v: _convection_diffusion(cs[0], v)
    b = bs[0]
    # two cycles of GMRES(10) from x = 0, as scipy's; each cycle: 10 Arnoldi
    # products and one for the true residual
    x, stats = ij.GMRES(rtol=1e-14, restart=10, max_steps=2).solve_with_stats(matvec, b)
    want = scipy_gmres(a, np.asarray(b).ravel(), restart=10, maxiter=2, rtol=1e-14)[0]
    np.testing.assert_allclose(np.asarray(x).ravel(), want, rtol=1e-8, atol=1e-12)
    assert int(stats.num_matvecs) == 22 and not bool(stats.converged)
    # to convergence: the dense solution, counted; under vmap, per system
    solver = ij.GMRES(rtol=1e-10, restart=30)
    x, stats = solver.solve_with_stats(matvec, b)
    assert bool(stats.converged) and not bool(stats.breakdown)
    np.testing.assert_allclose(
        np.asarray(x).ravel(), np.linalg.solve(a, np.asarray(b).ravel()), atol=1e-8
    )
    counts = jax.vmap(
        lambda c, b: (
            solver.solve_with_stats(lambda v: _convection_diffusion(c, v), b)[
                1
            ].num_matvecs
        )
    )(cs, bs)
    for c, b, count in zip(cs, bs, counts, strict=True):
        one = solver.solve_with_stats(lambda v: _convection_diffusion(c, v), b)[1]
        assert int(count) == int(one.num_matvecs) > 0
    # the implicit derivative (the transposed system, by the same GMRES)
    grad = jax.grad(lambda b: jnp.sum(jnp.sin(solver.solve(matvec, b))))(b)
    xs = np.linalg.solve(a, np.asarray(b).ravel())
    want = np.linalg.solve(a.T, np.cos(xs))
    np.testing.assert_allclose(np.asarray(grad).ravel(), want, atol=1e-8)


def test_gcrodr_under_vmap_counts_per_sequence():
    cs, bs = _convection_sequence(count=4)
    solver = iterjax_linear.GCRODR(4, 16, rtol=1e-9)
    run = lambda cs, bs: iterjax_linear.solve_sequence(
        solver, _convection_diffusion, cs, bs
    )
    both = jax.jit(jax.vmap(run))(jnp.stack([cs, 2 * cs]), jnp.stack([bs, -bs]))
    for i, (c, b) in enumerate([(cs, bs), (2 * cs, -bs)]):
        xs, stats = run(c, b)
        np.testing.assert_allclose(both[0][i], xs, atol=1e-10)
        np.testing.assert_array_equal(both[1].num_matvecs[i], stats.num_matvecs)


def test_gcrodr_reports_non_convergence_and_bad_hyperparameters():
    c, b = jnp.array([3.0, 1.0]), _convection_sequence()[1][0]
    solver = iterjax_linear.GCRODR(2, 4, rtol=1e-12, max_cycles=2)
    x, stats, _ = solver.solve(lambda v: _convection_diffusion(c, v), b, solver.init(b))
    assert not bool(stats.converged) and bool(jnp.all(jnp.isfinite(x)))
    with pytest.raises(ValueError, match="restart"):
        iterjax_linear.GCRODR(subspace=10, restart=15)
    with pytest.raises(ValueError, match="subspace"):
        iterjax_linear.GCRODR(subspace=0)
    with pytest.raises(ValueError, match="rtol"):
        iterjax_linear.GCRODR(rtol=-1.0)


def test_restarted_cg_is_the_adaptive_polynomial_gradient_method():
    # Each cycle of k + 1 steps minimises the quadratic over x_t + K_{k+1}(A, r_t):
    # the gradient step with the best polynomial preconditioner of degree k
    # (Doikov & Rodomanov); compared with that minimiser formed densely
    matvec, b, a = poisson_1d(n=40, decades=2.0)
    k = 3

    def krylov_step(x):
        r = b - a @ x
        basis = jnp.linalg.qr(
            jnp.stack([jnp.linalg.matrix_power(a, i) @ r for i in range(k + 1)], 1)
        )[0]
        c = jnp.linalg.solve(basis.T @ a @ basis, basis.T @ r)
        return x + basis @ c

    x1 = krylov_step(jnp.zeros(40))
    x2 = krylov_step(x1)
    for cycles, expected in [(1, x1), (2, x2)]:
        solver = ij.CG(rtol=0.0, max_steps=cycles * (k + 1), restart=k + 1)
        x, stats = solver.solve_with_stats(matvec, b)
        assert int(stats.num_matvecs) == cycles * (k + 1)
        np.testing.assert_allclose(x, expected, rtol=1e-8, atol=1e-12)
    # not the same as unrestarted CG after two cycles (its space is larger) ...
    plain = ij.CG(rtol=0.0, max_steps=2 * (k + 1)).solve(matvec, b)
    exact = jnp.linalg.solve(a, b)
    energy = lambda x: (x - exact) @ a @ (x - exact)
    assert energy(plain) < 0.9 * energy(x2)
    # ... and it converges to the same solution, in more products
    x, stats = ij.CG(rtol=1e-12, max_steps=10**5, restart=k + 1).solve_with_stats(
        matvec, b
    )
    np.testing.assert_allclose(x, exact, rtol=1e-9)
    _, full = ij.CG(rtol=1e-12).solve_with_stats(matvec, b)
    assert int(full.num_matvecs) < int(stats.num_matvecs)
    with pytest.raises(ValueError, match="restart"):
        ij.CG(restart=0)


# --- Operators: a function, a dense matrix or a BCOO matrix, for every solver.


def _spd_stencil(n=40):
    """A variable-coefficient 1-D diffusion matrix (SPD, tridiagonal) as scipy
    CSR, with a right-hand side: eigenvalues in (0.4, 4.6)."""
    import scipy.sparse as sp

    k = 1.0 + 0.5 * np.sin(np.arange(n + 1))
    main = k[:-1] + k[1:] + 0.2
    return sp.diags([-k[1:-1], main, -k[1:-1]], [-1, 0, 1], format="csr"), jnp.cos(
        jnp.arange(n, dtype=jnp.float64)
    )


OPERATOR_SOLVERS = {
    "cg": ij.CG(rtol=1e-12),
    "gmres": ij.GMRES(rtol=1e-12),
    "bicgstab": ij.BiCGStab(rtol=1e-12),
    "chebyshev": iterjax_linear.Chebyshev(bounds=(0.2, 5.0), rtol=1e-12),
    "richardson": iterjax_linear.Richardson(damping=0.2, atol=1e-13, max_steps=5000),
    "neumann": iterjax_linear.Neumann(terms=400, damping=0.2),
    "cg-jacobi": ij.CG(rtol=1e-12, preconditioner=JacobiPreconditioner()),
}


@pytest.mark.parametrize("name", OPERATOR_SOLVERS)
def test_every_solver_takes_a_function_a_dense_or_a_bcoo_matrix(name):
    S, b = _spd_stencil()
    A = iterjax_linear.from_scipy(S)
    dense = jnp.asarray(S.toarray())
    exact = np.linalg.solve(S.toarray(), np.asarray(b))
    solver = OPERATOR_SOLVERS[name]
    out = {}
    for kind, op in [("fn", lambda x: dense @ x), ("dense", dense), ("bcoo", A)]:
        x, stats = jax.jit(lambda b, op=op: solver.solve_with_stats(op, b))(b)
        np.testing.assert_allclose(x, exact, rtol=1e-9, atol=1e-9)
        out[kind] = (x, int(stats.num_matvecs))
        if name != "neumann":  # a fixed number of terms: no tolerance to meet
            assert bool(stats.converged), kind
    # the same iteration whatever the operator's form (same products, the
    # sums in another order) ...
    np.testing.assert_allclose(out["bcoo"][0], out["fn"][0], rtol=1e-10, atol=1e-11)
    if name == "cg-jacobi":  # ... but a matrix's diagonal is read, not probed
        assert out["fn"][1] == out["bcoo"][1] + 40 == out["dense"][1] + 40
    else:
        assert out["fn"][1] == out["bcoo"][1] == out["dense"][1]


def test_bcoo_matrices_vmap_and_differentiate_through_the_implicit_adjoint():
    S, b = _spd_stencil(24)
    A = iterjax_linear.from_scipy(S)
    scales = jnp.array([1.0, 2.0, 0.5])
    batch = jax.experimental.sparse.BCOO(
        (
            A.data[None] * scales[:, None],
            jnp.broadcast_to(A.indices, (3, *A.indices.shape)),
        ),
        shape=(3, 24, 24),
    )
    xs = jax.jit(jax.vmap(ij.CG(rtol=1e-12).solve, in_axes=(0, None)))(batch, b)
    exact = np.linalg.solve(S.toarray(), np.asarray(b))
    for s, x in zip(scales, xs):
        np.testing.assert_allclose(x, exact / s, rtol=1e-9)

    # d/d(values) of a loss on A^{-1} b, the fixed point of a Richardson map
    # of the BCOO matrix (implicit adjoint), against the dense closed form
    def loss(data):
        M = jax.experimental.sparse.BCOO((data, A.indices), shape=A.shape)
        sol = ij.fixed_point(
            lambda x, M: x - 0.2 * (M @ x - b),
            jnp.zeros_like(b),
            M,
            atol=1e-13,
            max_steps=5000,
        )
        return jnp.sum(jnp.sin(sol.value))

    def dense_loss(data):
        M = jnp.zeros(A.shape).at[A.indices[:, 0], A.indices[:, 1]].add(data)
        return jnp.sum(jnp.sin(jnp.linalg.solve(M, b)))

    np.testing.assert_allclose(
        jax.grad(loss)(A.data), jax.grad(dense_loss)(A.data), rtol=1e-7, atol=1e-9
    )


def test_from_scipy_keeps_the_matrix_and_bad_operators_are_named():
    import scipy.sparse as sp

    S = sp.random(30, 30, density=0.2, random_state=np.random.default_rng(0))
    S = S + S.T + sp.eye(30) * 30  # with duplicates summed the scipy way
    A = iterjax_linear.from_scipy(S)
    v = np.random.default_rng(1).normal(size=30)
    np.testing.assert_allclose(A @ jnp.asarray(v), S @ v, rtol=1e-12)
    np.testing.assert_allclose(
        iterjax_linear.as_matvec(A).diagonal(), S.diagonal(), rtol=1e-12
    )
    b = jnp.ones(30)
    with pytest.raises(TypeError, match=r"`matvec`: a scipy.sparse .*from_scipy"):
        ij.CG().solve(S, b)
    with pytest.raises(ValueError, match=r"`matvec`: a matrix must be square"):
        ij.GMRES().solve(jnp.ones((30, 29)), b)
    with pytest.raises(ValueError, match=r"`matvec`: a matrix must be square"):
        ij.CG().solve(b, b)
    with pytest.raises(TypeError, match=r"`matvec` must be a function"):
        ij.CG().solve("A", b)
    with pytest.raises(TypeError, match=r"`A` must be a scipy.sparse matrix"):
        iterjax_linear.from_scipy(np.eye(3))


# --- Geometric multigrid: V- and W-cycles on a structured grid, as CG's M.


def _grid(n):
    x = jnp.linspace(0.0, 1.0, n)
    k = 1.0 + 0.5 * jnp.sin(6 * x)[:, None] * jnp.cos(4 * x)[None, :]
    return ij.gallery.Poisson2D(k), jnp.ones((n, n))


def test_restriction_is_full_weighting_and_prolongation_four_times_its_transpose():
    from iterjax.linear.multigrid import prolong, restrict

    i = jnp.arange(1.0, 16.0)  # n = 15 -> m = 7; coarse node I is fine node 2I + 1
    linear = 3.0 * i[:, None] - 2.0 * i[None, :]
    np.testing.assert_allclose(restrict(linear)[1:-1, 1:-1], linear[3:-3:2, 3:-3:2])
    u, v = jax.random.normal(jax.random.PRNGKey(0), (2, 7, 7))
    w = jax.random.normal(jax.random.PRNGKey(1), (15, 15))
    np.testing.assert_allclose(
        jnp.vdot(prolong(u, 15), w), 4 * jnp.vdot(u, restrict(w)), rtol=1e-12
    )
    # bilinear interpolation: exact on a bilinear function, inside the boundary
    c = jnp.arange(1.0, 8.0)
    fine = prolong(c[:, None] * c[None, :], 15)
    half = jnp.arange(1.0, 16.0) / 2
    np.testing.assert_allclose(
        fine[1:-1, 1:-1], (half[:, None] * half[None, :])[1:-1, 1:-1]
    )


@pytest.mark.parametrize(
    "mg",
    [
        Multigrid(),
        Multigrid(cycle="W", coarsest=3),
        Multigrid(smoother="jacobi", pre=2, post=2),
        Multigrid(cycle="W", coarsest=3, coarsening="galerkin"),
        Multigrid(coarsest=3, coarsening="galerkin", interpolation="operator"),
    ],
    ids=["V-gs", "W-gs", "V-jacobi", "W-galerkin", "V-operator"],
)
def test_a_multigrid_cycle_is_symmetric_positive_definite(mg):
    A, b = _grid(31)
    # the levels built inside: one compilation, not eager dispatch
    apply = jax.jit(lambda v: mg.build(A, v)[0](v))
    x, y = jax.random.normal(jax.random.PRNGKey(2), (2, 31, 31))
    np.testing.assert_allclose(jnp.vdot(apply(x), y), jnp.vdot(x, apply(y)), rtol=1e-11)
    assert float(jnp.vdot(apply(x), x)) > 0


@pytest.mark.slow  # a scaling study, to 127 x 127
def test_cg_with_multigrid_needs_iterations_flat_in_the_grid_size():
    # variable coefficients; CG's products double with n, CG + V(1,1)'s
    # iterations stay flat (products: iterations x (1 + cycle) + setup + cycle)
    products, iterations = {}, {}
    for n in (31, 63, 127):
        A, b = _grid(n)
        for name, solver in [
            ("cg", ij.CG(rtol=1e-10)),
            ("mg", ij.CG(rtol=1e-10, preconditioner=Multigrid())),
        ]:
            x, stats = jax.jit(lambda b, s=solver, A=A: s.solve_with_stats(A, b))(b)
            assert bool(stats.converged)
            assert float(jnp.linalg.norm(b - A(x))) <= 1e-10 * float(jnp.linalg.norm(b))
            products[name, n] = int(stats.num_matvecs)
        _, setup, cycle = Multigrid().build(A, b)
        iterations[n] = (products["mg", n] - setup - cycle) / (1 + cycle)
    assert max(iterations.values()) <= min(iterations.values()) + 2, iterations
    assert products["cg", 127] > 1.9 * products["cg", 63] > 3.6 * products["cg", 31]
    assert products["cg", 127] >= 7 * products["mg", 127], products  # 670 vs 91


def test_multigrid_under_jit_and_vmap_over_coefficients():
    A, b = _grid(15)
    ks = jnp.stack([A.k, 2.0 * A.k, A.k**2])
    solver = ij.CG(rtol=1e-11, preconditioner=Multigrid(cycle="W", coarsest=3))
    run = lambda k: solver.solve_with_stats(ij.gallery.Poisson2D(k), b)
    xs, stats = jax.jit(jax.vmap(run))(ks)
    single = jax.jit(run)  # one compilation for the three unbatched solves
    for i, k in enumerate(ks):
        x, s = single(k)
        np.testing.assert_allclose(xs[i], x, rtol=1e-12, atol=1e-14)
        assert int(stats.num_matvecs[i]) == int(s.num_matvecs) and bool(s.converged)
    np.testing.assert_allclose(xs[1], xs[0] / 2, rtol=1e-9)


def test_multigrid_bad_operators_and_hyperparameters():
    A, b = _grid(31)
    with pytest.raises(TypeError, match="Multigrid: the operator must be a structured"):
        ij.CG(preconditioner=Multigrid()).solve(lambda x: A(x), b)
    even, b40 = _grid(40)
    with pytest.raises(ValueError, match="side 40 coarsens to side 40 > `coarsest`=15"):
        ij.CG(preconditioner=Multigrid()).solve(even, b40)
    for kwargs, match in [
        (dict(pre=0, post=0), "`pre` \\+ `post` must be >= 1"),
        (dict(pre=-1), "pre"),
        (dict(cycle="F"), "`cycle` must be 'V' or 'W'"),
        (dict(smoother="sor"), "`smoother`"),
        (dict(omega=1.5), "omega"),
        (dict(coarsest=0), "coarsest"),
        (dict(coarsening="algebraic"), "`coarsening`"),
    ]:
        with pytest.raises(ValueError, match=match):
            Multigrid(**kwargs)


def test_grad_through_a_multigrid_preconditioned_gmres_solve():
    # GMRES differentiates implicitly (the transposed system, same solver): d/dk
    # of a loss on A(k)^{-1} b, with the cycle built from the grid itself
    n = 15
    x = jnp.linspace(0.0, 1.0, n)
    k0 = 1.0 + 0.3 * jnp.outer(jnp.sin(3 * x), jnp.cos(2 * x))
    b = jnp.outer(jnp.sin(jnp.pi * x), x)
    solver = ij.GMRES(rtol=1e-13, preconditioner=Multigrid(coarsest=3))

    def loss(k):
        return jnp.sum(jnp.sin(solver.solve(ij.gallery.Poisson2D(k), b)))

    def dense_loss(k):
        A = ij.gallery.Poisson2D(k)
        cols = jax.vmap(lambda e: A(e.reshape(n, n)).reshape(-1))(jnp.eye(n * n))
        return jnp.sum(jnp.sin(jnp.linalg.solve(cols.T, b.reshape(-1))))

    np.testing.assert_allclose(loss(k0), dense_loss(k0), rtol=1e-11)
    np.testing.assert_allclose(
        jax.jit(jax.grad(loss))(k0), jax.grad(dense_loss)(k0), rtol=1e-8, atol=1e-12
    )


@pytest.mark.parametrize("name", OPERATOR_SOLVERS)
def test_every_solver_differentiates_with_respect_to_the_matrix_and_b(name):
    # CG, Chebyshev and Richardson run in custom_linear_solve (their loops are
    # not reverse-differentiable): the gradient is one more (transposed) solve
    S, b = _spd_stencil(12)
    A = iterjax_linear.from_scipy(S)
    solver = OPERATOR_SOLVERS[name]
    if name == "neumann":  # a truncated series: its own derivative, not A^{-1}'s
        solver = iterjax_linear.Neumann(terms=2000, damping=0.2)
    w = jnp.linspace(-1.0, 1.0, 12)

    def loss(data, b):
        M = jax.experimental.sparse.BCOO((data, A.indices), shape=A.shape)
        return jnp.sum(w * jnp.sin(solver.solve(M, b)))

    def dense_loss(data, b):
        M = jnp.zeros(A.shape).at[A.indices[:, 0], A.indices[:, 1]].add(data)
        return jnp.sum(w * jnp.sin(jnp.linalg.solve(M, b)))

    got = jax.jit(jax.grad(loss, argnums=(0, 1)))(A.data, b)
    want = jax.grad(dense_loss, argnums=(0, 1))(A.data, b)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-10)
    tangent = jax.jvp(lambda b: solver.solve(A, b), (b,), (w,))[1]
    np.testing.assert_allclose(tangent, np.linalg.solve(S.toarray(), w), rtol=1e-8)


@pytest.mark.slow  # a scaling study
def test_multigrid_as_a_solver_converges_in_steps_flat_in_the_grid_size():
    steps = {}
    for n in (15, 31, 63):
        A, b = _grid(n)
        solver = MultigridSolver(cycle=Multigrid(coarsest=3), rtol=1e-10)
        x, stats = jax.jit(lambda b, A=A: solver.solve_with_stats(A, b))(b)
        residual = float(jnp.linalg.norm(b - A(x)) / jnp.linalg.norm(b))
        assert bool(stats.converged) and residual <= 1e-10  # the true residual
        _, setup, cycle = Multigrid(coarsest=3).build(A, b)
        steps[n] = (int(stats.num_matvecs) - setup) // (1 + cycle)
    assert max(steps.values()) <= min(steps.values()) + 1 <= 22, steps  # 19, 20, 20
    # honest when capped, NaN in => NaN out; differentiable (the cycle is SPD)
    A, b = _grid(15)
    x, stats = MultigridSolver(
        max_steps=2, cycle=Multigrid(coarsest=3)
    ).solve_with_stats(A, b)
    assert not bool(stats.converged)
    assert float(jnp.linalg.norm(b - A(x))) > 1e-10 * float(jnp.linalg.norm(b))
    x, stats = MultigridSolver().solve_with_stats(A, b.at[3, 4].set(jnp.nan))
    assert bool(jnp.all(jnp.isnan(x))) and not bool(stats.converged)
    solver = MultigridSolver(cycle=Multigrid(coarsest=3), rtol=1e-13)
    loss = lambda k: jnp.sum(jnp.sin(solver.solve(ij.gallery.Poisson2D(k), b)))
    gmres = ij.GMRES(rtol=1e-13)
    ref = lambda k: jnp.sum(jnp.sin(gmres.solve(ij.gallery.Poisson2D(k), b)))
    np.testing.assert_allclose(
        jax.grad(loss)(A.k), jax.grad(ref)(A.k), rtol=1e-8, atol=1e-12
    )
    with pytest.raises(TypeError, match="`cycle` must be a preconditioner"):
        MultigridSolver(cycle="V")
    with pytest.raises(ValueError, match="max_steps"):
        MultigridSolver(max_steps=0)


def test_stencil9_probes_an_operator_and_forms_the_galerkin_product():
    from iterjax.linear import Stencil9
    from iterjax.linear.multigrid import prolong, restrict

    A, _ = _grid(15)
    u = jax.random.normal(jax.random.PRNGKey(4), (15, 15))
    np.testing.assert_allclose(Stencil9.probe(A, 15, u.dtype)(u), A(u), rtol=1e-12)
    G = Stencil9.galerkin(A, 15)
    uc, vc = jax.random.normal(jax.random.PRNGKey(5), (2, 7, 7))
    np.testing.assert_allclose(G(uc), restrict(A(prolong(uc, 15))), rtol=1e-12)
    np.testing.assert_allclose(jnp.vdot(G(uc), vc), jnp.vdot(uc, G(vc)), rtol=1e-12)
    # constant k: interior rows of R A P sum to 0, as the Laplacian's do; 9 points
    G1 = Stencil9.galerkin(ij.gallery.Poisson2D(jnp.ones((15, 15))), 15)
    np.testing.assert_allclose(G1.w[1:-1, 1:-1].sum((-1, -2)), 0.0, atol=1e-9)
    assert float(jnp.min(jnp.abs(G1.w[3, 3]))) > 0
    # four-colour Gauss-Seidel sweeps converge to the solve
    b = jnp.ones((7, 7))
    x = jax.lax.fori_loop(0, 300, lambda _, x: G.sweep(x, b, 1.0), jnp.zeros((7, 7)))
    np.testing.assert_allclose(G(x), b, rtol=1e-9, atol=1e-9)


def test_galerkin_coarsening_follows_rough_coefficients():
    # log-normal k (σ = 1) on 63 x 63: rediscretised coarse levels sample k and
    # miss its roughness: the cycle alone diverges, and CG + it needs 30
    # iterations; with R A P the cycle converges alone and CG needs 17
    n = 63
    k = jnp.exp(jax.random.normal(jax.random.PRNGKey(0), (n, n)))
    A, b = ij.gallery.Poisson2D(k), jnp.ones((n, n))
    iterations, alone = {}, {}
    for coarsening in ("rediscretise", "galerkin"):
        mg = Multigrid(coarsening=coarsening)
        setup, cycle = cycle_counts(mg, A)
        for name, solver in [
            ("cg", ij.CG(rtol=1e-10, preconditioner=mg)),
            ("alone", MultigridSolver(cycle=mg, rtol=1e-10, max_steps=100)),
        ]:
            x, stats = jax.jit(lambda b, s=solver: s.solve_with_stats(A, b))(b)
            residual = float(jnp.linalg.norm(b - A(x)))
            if bool(stats.converged):
                assert residual <= 1e-10 * float(jnp.linalg.norm(b)) * (1 + 1e-9)
            if name == "cg":
                assert bool(stats.converged)
                iterations[coarsening] = (int(stats.num_matvecs) - setup) // (1 + cycle)
            else:
                alone[coarsening] = bool(stats.converged)
    assert alone == {"rediscretise": False, "galerkin": True}
    assert iterations["galerkin"] * 1.5 < iterations["rediscretise"], iterations


def test_hessenberg_least_squares_is_lstsq_on_the_columns_reached():
    rng = np.random.default_rng(0)
    s = 8
    H = np.triu(rng.normal(size=(s + 1, s)), -1)
    for steps in (1, 5, s):
        reached = np.zeros((s + 1, s))
        reached[:, :steps] = H[:, :steps]
        rhs = np.eye(s + 1)[0] * 2.5
        want = np.linalg.lstsq(reached, rhs, rcond=None)[0]
        got = hessenberg_lstsq(jnp.asarray(reached), jnp.asarray(2.5), steps)
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-10, atol=1e-14)
        assert np.all(np.asarray(got)[steps:] == 0)
    # a reached block that is singular (A singular on the Krylov space): the
    # minimum-norm least-squares answer, not inf
    singular = np.zeros((s + 1, s))
    singular[:3, :2] = [[1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]
    got = np.asarray(hessenberg_lstsq(jnp.asarray(singular), jnp.asarray(1.0), 2))
    want = np.linalg.lstsq(singular, np.eye(s + 1)[0], rcond=None)[0]
    np.testing.assert_allclose(got, want, atol=1e-12)


@pytest.mark.parametrize("passes", [1, 2])
def test_arnoldi_relation_and_orthogonality(passes):
    # A V_sᵀ = V_{s+1}ᵀ H̄ holds with either number of Gram-Schmidt passes; two
    # passes keep the basis orthonormal to working precision, where one loses
    # digits as κ(A) grows (here 1e12)
    n, s = 100, 40
    d = jnp.geomspace(1.0, 1e12, n)
    V, H, _, steps = arnoldi(
        lambda v: d * v, jnp.ones(n), jnp.zeros((n, 0)), s, 0.0, passes
    )
    assert int(steps) == s
    AV = V[:s] * d[None]
    np.testing.assert_allclose(AV, H.T @ V, atol=1e-12 * float(jnp.max(jnp.abs(AV))))
    loss = float(jnp.max(jnp.abs(V @ V.T - jnp.eye(s + 1))))
    assert loss < 1e-14 if passes == 2 else loss > 1e-12


def test_gmres_reorthogonalise_must_be_a_bool():
    with pytest.raises(TypeError, match="GMRES: `reorthogonalise` must be a bool"):
        ij.GMRES(reorthogonalise=1)


# --- M-FAC: inverse products with the damped empirical Fisher of m gradients.


def _fisher(G, lam):
    return lam * jnp.eye(G.shape[1]) + G.T @ G / G.shape[0]


def test_mfac_is_exact_on_the_damped_fisher_it_stands_for():
    G = jax.random.normal(jax.random.key(0), (7, 30))
    b = jax.random.normal(jax.random.key(1), (30,))
    A = _fisher(G, 0.05)
    x, stats = ij.linear.MFAC(G, 0.05).solve_with_stats(A, b)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-10)
    assert bool(stats.converged) and int(stats.num_matvecs) == 1
    # a pytree right-hand side with per-leaf gradient samples: the same solve
    tree_b = {"u": b[:10], "v": b[10:].reshape(4, 5)}
    tree_G = {"u": G[:, :10], "v": G[:, 10:].reshape(7, 4, 5)}
    xt = ij.linear.MFAC(tree_G, 0.05).solve(lambda t: t, tree_b)
    np.testing.assert_allclose(
        jnp.concatenate([xt["u"], xt["v"].ravel()]), x, rtol=1e-10
    )


def test_mfac_reports_an_operator_that_is_not_its_fisher():
    # honest: the answer is F⁻¹ b, and A x = b is tested with A's own product
    G = jax.random.normal(jax.random.key(0), (7, 30))
    b = jnp.ones(30)
    A = _fisher(G, 0.05) + 0.5 * jnp.eye(30)
    x, stats = ij.linear.MFAC(G, 0.05).solve_with_stats(A, b)
    assert bool(jnp.all(jnp.isfinite(x))) and not bool(stats.converged)
    nan_x, nan_stats = ij.linear.MFAC(G, 0.05).solve_with_stats(
        _fisher(G, 0.05), b.at[3].set(jnp.nan)
    )
    assert bool(jnp.all(jnp.isnan(nan_x))) and not bool(nan_stats.converged)


def test_mfac_as_the_hypergradients_solver_under_jit_vmap_and_grad():
    # ridge: the inner Hessian Xᵀ X / m + λ I is the damped Fisher of X's rows
    m, d, lam = 6, 10, 0.1
    X = jax.random.normal(jax.random.key(0), (m, d))
    y = jnp.arange(m * 1.0)
    inner = lambda w, th: 0.5 * jnp.mean((X @ w - y) ** 2) + 0.5 * lam * w @ w + th @ w
    outer = lambda w, th: jnp.sum((w - 1.0) ** 2)

    def hypergrad(th, solver):
        method = ij.bilevel.Implicit(linear_solver=solver)
        return ij.hypergradient(outer, inner, th, jnp.zeros(d), method=method)

    thetas = 0.1 * jax.random.normal(jax.random.key(2), (3, d))
    got = jax.jit(jax.vmap(lambda th: hypergrad(th, ij.linear.MFAC(X, lam))))(thetas)
    ref = jax.vmap(lambda th: hypergrad(th, ij.linear.CG()))(thetas)
    np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-12)
    # differentiable in the right-hand side and in the gradients themselves
    solve = lambda G, b: ij.linear.MFAC(G, lam).solve(lambda v: v, b)
    check_grads(solve, (X, jnp.linspace(-1.0, 1.0, d)), order=1, modes=("rev", "fwd"))


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda G: ij.linear.MFAC(G, 0.0), "MFAC.*damping"),
        (
            lambda G: ij.linear.MFAC(G[:, :5], 0.1).solve(lambda v: v, jnp.ones(6)),
            "`gradients` must be",
        ),
    ],
)
def test_mfac_bad_input_is_named(make, match):
    with pytest.raises(ValueError, match=match):
        make(jnp.ones((3, 6)))


def test_sliding_mfac_equals_mfac_on_the_latest_window_under_jit_vmap_and_grad():
    m, d, lam = 8, 30, 0.05
    G = jax.random.normal(jax.random.key(0), (50, d))
    b = jax.random.normal(jax.random.key(1), (d,))
    empty = ij.linear.SlidingMFAC.empty(jnp.zeros(d), m=m, damping=lam)
    # 50 pushes through one jitted scan: the window holds the last 8 (in ring
    # order, which the operator does not see)
    window = jax.jit(
        lambda w, G: jax.lax.scan(lambda w, g: (w.push(g), None), w, G)[0]
    )(empty, G)
    A = _fisher(G[-m:], lam)
    x, stats = window.solve_with_stats(A, b)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-9)
    assert bool(stats.converged) and int(stats.num_matvecs) == 1
    np.testing.assert_allclose(x, ij.linear.MFAC(G[-m:], lam).solve(A, b), rtol=1e-9)
    # K⁻¹ after 50 rank-2 updates against the recomputed one
    np.testing.assert_allclose(window.kinv, window.refresh().kinv, atol=1e-12)
    # a partial window: zero rows, F = λI + (sum of the k gradients' outer
    # products) / m
    three = empty.push(G[0]).push(G[1]).push(G[2])
    A3 = lam * jnp.eye(d) + G[:3].T @ G[:3] / m
    np.testing.assert_allclose(three.solve(A3, b), np.linalg.solve(A3, b), rtol=1e-9)
    # honest: an operator it does not stand for is reported
    assert not bool(window.solve_with_stats(A + 0.5 * jnp.eye(d), b)[1].converged)
    nan_x, nan_stats = window.solve_with_stats(A, b.at[3].set(jnp.nan))
    assert bool(jnp.all(jnp.isnan(nan_x))) and not bool(nan_stats.converged)
    # vmap over right-hand sides; gradients w.r.t. b and the pushed gradient
    bs = jax.random.normal(jax.random.key(2), (3, d))
    np.testing.assert_allclose(
        jax.vmap(lambda b: window.solve(A, b))(bs),
        np.linalg.solve(A, bs.T).T,
        rtol=1e-9,
    )
    solve = lambda g, b: empty.push(g).solve(lambda v: v, b)
    check_grads(solve, (G[0], b), order=1, modes=("rev", "fwd"))
    # O(d m + m²) a push and a product: doubling d doubles the flops
    flops = lambda d: (
        jax.jit(lambda w, g, b: w.push(g).solve(lambda v: v, b))
        .lower(
            ij.linear.SlidingMFAC.empty(jnp.zeros(d), m=m, damping=lam),
            jnp.ones(d),
            jnp.ones(d),
        )
        .cost_analysis()["flops"]
    )
    assert 1.8 < flops(8000) / flops(4000) < 2.2
    with pytest.raises(ValueError, match="`m` must be"):
        ij.linear.SlidingMFAC.empty(jnp.zeros(d), m=0)
    with pytest.raises(ValueError, match="SlidingMFAC.push"):
        empty.push(jnp.ones(d + 1))
    with pytest.raises(ValueError, match="damping"):
        ij.linear.SlidingMFAC.empty(jnp.zeros(d), m=2, damping=0.0)


# --- Randomized Nyström preconditioning (Frangella, Tropp & Udell 2023).


def _kernel_system(n=300, mu=1e-4, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 3))
    K = np.exp(-((X[:, None] - X[None]) ** 2).sum(-1) / 2)
    return jnp.asarray(K + mu * np.eye(n)), jnp.asarray(rng.normal(size=n)), mu


def test_nystrom_is_exact_on_a_low_rank_plus_shift_system():
    # K of rank 10 <= ℓ: the preconditioned operator is (λ_ℓ + μ) I on range(K)
    # and I elsewhere, two distinct eigenvalues: CG needs at most 2 steps
    G = jax.random.normal(jax.random.key(0), (10, 80))
    A = G.T @ G + 0.3 * jnp.eye(80)
    b = jnp.linspace(-1.0, 1.0, 80)
    P = ij.linear.NystromPreconditioner(rank=12, shift=0.3)
    x, stats = ij.CG(rtol=1e-10, preconditioner=P).solve_with_stats(A, b)
    np.testing.assert_allclose(x, np.linalg.solve(A, b), rtol=1e-8)
    assert bool(stats.converged) and int(stats.num_matvecs) <= 12 + 3


def test_nystrom_cuts_cg_products_on_kernel_ridge_under_jit_and_vmap():
    A, b, mu = _kernel_system()
    B = jnp.stack([b, -2.0 * b + 1.0])
    P = ij.linear.NystromPreconditioner(rank=60, shift=mu)

    def run(preconditioner):
        cg = ij.CG(rtol=1e-8, max_steps=5000, preconditioner=preconditioner)
        return jax.jit(jax.vmap(lambda b: cg.solve_with_stats(A, b)))(B)

    x, stats = run(P)
    x_plain, plain = run(None)
    assert bool(jnp.all(stats.converged)) and bool(jnp.all(plain.converged))
    for xi, bi in zip(x, B):  # the residual, recomputed
        assert (
            float(jnp.linalg.norm(A @ xi - bi))
            <= 1e-8 * float(jnp.linalg.norm(bi)) * 1.01
        )
    # the build's ℓ products included, still far fewer than plain CG's
    assert int(jnp.max(stats.num_matvecs)) * 2 < int(jnp.min(plain.num_matvecs))


@pytest.mark.parametrize(
    "make, match",
    [
        (
            lambda: ij.linear.NystromPreconditioner(rank=0),
            "NystromPreconditioner.*rank",
        ),
        (
            lambda: ij.linear.NystromPreconditioner(shift=-1.0),
            "NystromPreconditioner.*shift",
        ),
        (
            lambda: ij.CG(preconditioner=ij.linear.NystromPreconditioner(rank=9)).solve(
                jnp.eye(4), jnp.ones(4)
            ),
            "`rank` 9 exceeds the dimension 4",
        ),
    ],
)
def test_nystrom_bad_hyperparameters_are_named(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --- Sketch-and-project (randomized block coordinate descent).


def test_sketch_and_project_solves_a_kernel_system_under_jit_and_vmap():
    A, b, _ = _kernel_system(n=200, mu=1e-2)
    B = jnp.stack([b, jnp.ones(200)])
    solver = ij.linear.SketchAndProject(block=50)
    x, stats = jax.jit(jax.vmap(lambda b: solver.solve_with_stats(A, b)))(B)
    assert bool(jnp.all(stats.converged))
    for xi, bi in zip(x, B):
        np.testing.assert_allclose(xi, np.linalg.solve(A, bi), rtol=1e-5, atol=1e-6)
    # bigger blocks: fewer epochs (each about one product's work)
    _, big = ij.linear.SketchAndProject(block=100).solve_with_stats(A, b)
    assert int(big.num_matvecs) < int(stats.num_matvecs[0])


def test_sketch_and_project_reports_a_budget_too_small():
    A, b, _ = _kernel_system(n=200, mu=1e-2)
    x, stats = ij.linear.SketchAndProject(block=10, max_epochs=1).solve_with_stats(A, b)
    assert bool(jnp.all(jnp.isfinite(x))) and not bool(stats.converged)
    assert int(stats.num_matvecs) == 2  # one epoch, then the residual's product


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: ij.linear.SketchAndProject(block=0), ValueError, "block"),
        (
            lambda: ij.linear.SketchAndProject().solve(lambda v: v, jnp.ones(3)),
            TypeError,
            "must be a dense matrix",
        ),
        (
            lambda: ij.linear.SketchAndProject().solve(jnp.eye(3), jnp.ones(4)),
            ValueError,
            "`b` must be a vector of 3",
        ),
    ],
)
def test_sketch_and_project_bad_input_is_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


# --- Geometric multigrid in 3-D: Poisson3D (7 points), trilinear transfers


def _grid3(n, sigma=0.0):
    """Poisson3D on a log-normal field (sigma = 0: constant k), and b = 1."""
    k = ij.gallery.lognormal_coefficient(n, sigma, width=3, seed=1, ndim=3)
    return ij.gallery.Poisson3D(jnp.asarray(k)), jnp.ones((n, n, n))


def test_poisson3d_is_its_assembled_seven_point_matrix():
    A, _ = _grid3(5, sigma=1.0)
    u = jax.random.normal(jax.random.PRNGKey(0), (5, 5, 5))
    matrix = A.assemble()
    assert matrix.nnz == 5**3 + 6 * 4 * 25  # the diagonal and the inner edges
    np.testing.assert_allclose(
        A(u).reshape(-1), matrix @ np.asarray(u).reshape(-1), rtol=1e-12
    )
    np.testing.assert_allclose(A.diagonal().reshape(-1), matrix.diagonal(), rtol=1e-14)
    # constant k: (6 u - the six neighbours) / h², the textbook stencil
    ones = ij.gallery.Poisson3D(jnp.ones((5, 5, 5)))
    up = np.pad(np.asarray(u), 1)
    c = (slice(1, -1),) * 3
    six = sum(np.roll(up, s, axis)[c] for axis in range(3) for s in (1, -1))
    np.testing.assert_allclose(ones(u), 36.0 * (6 * up[c] - six), rtol=1e-12)
    # red-black Gauss-Seidel: one colour's nodes never neighbour each other
    b = jnp.ones((5, 5, 5))
    swept = A.sweep(jnp.zeros_like(b), b, 1.0)
    red = np.indices((5, 5, 5)).sum(0) % 2 == 0
    np.testing.assert_allclose(np.asarray(swept)[red], (b / A.diagonal())[red])
    with pytest.raises(ValueError, match="`k` must be a grid of side n in each of 3"):
        ij.gallery.Poisson3D(jnp.ones((5, 5)))
    with pytest.raises(ValueError, match="got shape \\(5, 4, 5\\)"):
        ij.gallery.Poisson3D(jnp.ones((5, 4, 5)))
    # stacked fields are a batch of operators, vmapped as a pytree
    batch = ij.gallery.Poisson3D(jnp.stack([A.k, 2 * A.k]))
    axes = (ij.gallery.Poisson3D(0, None),)  # k batched, the shift shared
    out = jax.vmap(lambda op: op(u), in_axes=axes)(batch)
    np.testing.assert_allclose(out[1], 2 * A(u), rtol=1e-12)


def test_restriction_and_prolongation_in_3d():
    from iterjax.linear.multigrid import prolong, restrict

    i = jnp.arange(1.0, 16.0)  # n = 15 -> m = 7; coarse node I is fine node 2I + 1
    linear = i[:, None, None] - 2.0 * i[None, :, None] + 0.5 * i[None, None, :]
    inner = (slice(1, -1),) * 3
    np.testing.assert_allclose(restrict(linear)[inner], linear[(slice(3, -3, 2),) * 3])
    u = jax.random.normal(jax.random.PRNGKey(0), (7, 7, 7))
    w = jax.random.normal(jax.random.PRNGKey(1), (15, 15, 15))
    np.testing.assert_allclose(
        jnp.vdot(prolong(u, 15), w), 8 * jnp.vdot(u, restrict(w)), rtol=1e-12
    )
    # trilinear interpolation: exact on a trilinear function, inside the boundary
    c = jnp.arange(1.0, 8.0)
    half = jnp.arange(1.0, 16.0) / 2
    cube = lambda a: a[:, None, None] * a[None, :, None] * a[None, None, :]
    np.testing.assert_allclose(prolong(cube(c), 15)[inner], cube(half)[inner])


@pytest.mark.slow  # a scaling study, to 31³ unknowns
@pytest.mark.parametrize("sigma", [0.0, 1.0], ids=["poisson", "lognormal"])
def test_cg_with_3d_multigrid_scales_with_the_grid_side(sigma):
    # 7³ to 31³ unknowns (343 to 29791); the answer is the dense solve's at 7³.
    # CG's products double with the side. CG + V(1,1): iterations flat where k is
    # constant (11, 12 at 15³, 31³); on a log-normal k (σ = 1) they grow (14, 19,
    # 24), as in 2-D where rediscretised coarse operators miss k's roughness,
    # yet take 3x fewer products than CG at 31³
    iterations, products = {}, {}
    mg = Multigrid(coarsest=3)
    for n in (7, 15, 31):
        A, b = _grid3(n, sigma)
        for name, solver in [
            ("cg", ij.CG(rtol=1e-10)),
            ("mg", ij.CG(rtol=1e-10, preconditioner=mg)),
        ]:
            x, stats = jax.jit(lambda b, s=solver, A=A: s.solve_with_stats(A, b))(b)
            assert bool(stats.converged), (name, n)
            assert float(jnp.linalg.norm(b - A(x))) <= 1e-10 * float(jnp.linalg.norm(b))
            products[name, n] = int(stats.num_matvecs)
            if n == 7:
                dense = jnp.asarray(A.assemble().toarray())
                exact = jnp.linalg.solve(dense, b.reshape(-1)).reshape(b.shape)
                np.testing.assert_allclose(x, exact, rtol=1e-8, atol=1e-12)
        _, setup, cycle = mg.build(A, b)
        iterations[n] = (products["mg", n] - setup - cycle) / (1 + cycle)
    assert products["cg", 31] > 1.8 * products["cg", 15] > 3.2 * products["cg", 7]
    if sigma == 0.0:
        assert iterations[31] <= iterations[15] + 2, iterations
    else:
        assert iterations[31] < 2 * iterations[7], iterations
        assert products["cg", 31] >= 2.5 * products["mg", 31], products


def test_a_3d_multigrid_cycle_is_spd_and_solves_under_jit_vmap_and_grad():
    A, b = _grid3(15, sigma=1.0)
    mg = Multigrid(coarsest=3)
    apply = jax.jit(mg.build(A, b)[0])
    x, y = jax.random.normal(jax.random.PRNGKey(2), (2, 15, 15, 15))
    np.testing.assert_allclose(jnp.vdot(apply(x), y), jnp.vdot(x, apply(y)), rtol=1e-11)
    assert float(jnp.vdot(apply(x), x)) > 0
    # the cycle alone as a solver: converged, the true residual within rtol
    solver = MultigridSolver(cycle=mg, rtol=1e-10)
    x, stats = jax.jit(lambda b: solver.solve_with_stats(A, b))(b)
    assert bool(stats.converged)
    assert float(jnp.linalg.norm(b - A(x))) <= 1e-10 * float(jnp.linalg.norm(b))
    # vmap over coefficient fields: each lane as its own solve (on 7³)
    A, b = _grid3(7, sigma=1.0)
    cg = ij.CG(rtol=1e-11, preconditioner=mg)
    run = lambda k: cg.solve_with_stats(ij.gallery.Poisson3D(k), b)
    ks = jnp.stack([A.k, 2.0 * A.k])
    xs, batch = jax.jit(jax.vmap(run))(ks)
    one, s = jax.jit(run)(ks[1])
    np.testing.assert_allclose(xs[1], one, rtol=1e-12, atol=1e-14)
    assert int(batch.num_matvecs[1]) == int(s.num_matvecs)
    np.testing.assert_allclose(xs[1], xs[0] / 2, rtol=1e-9)
    # grad with respect to b through the preconditioned CG (its transposed
    # solve): for A symmetric, d/db sum(w * A⁻¹ b) = A⁻¹ w
    w = jnp.sin(jnp.arange(7.0**3)).reshape(b.shape)
    g = jax.jit(jax.grad(lambda b: jnp.vdot(w, cg.solve(A, b))))(b)
    np.testing.assert_allclose(A(g), w, rtol=1e-8, atol=1e-8 * float(jnp.abs(w).max()))


def cycle_counts(mg, A):
    """A multigrid cycle's (build, per_apply) product counts, traced abstractly
    (its levels are not built)."""
    counts = []
    jax.eval_shape(lambda A: counts.append(mg.build(A, A.k)[1:]), A)
    return counts[0]


def galerkin_cg_steps(A, b, interpolation):
    """CG + Galerkin V(1,1)'s steps to rtol 1e-8, checked on the true residual."""
    mg = Multigrid(coarsening="galerkin", interpolation=interpolation)
    x, stats = jax.jit(
        lambda b: ij.CG(rtol=1e-8, preconditioner=mg).solve_with_stats(A, b)
    )(b)
    assert bool(stats.converged)
    assert float(jnp.linalg.norm(b - A(x)) / jnp.linalg.norm(b)) <= 1e-8
    build, per_apply = cycle_counts(mg, A)
    return (int(stats.num_matvecs) - build - per_apply) / (1 + per_apply)


def test_operator_dependent_interpolation_is_bilinear_on_poisson_and_follows_rough_k():
    from iterjax.linear.multigrid import operator_transfer, prolong, restrict

    A = ij.gallery.Poisson2D(jnp.ones((31, 31)))
    R, P = operator_transfer(Stencil.probe(A, 31, jnp.float64))
    uc = jax.random.normal(jax.random.PRNGKey(7), (15, 15))
    r = jax.random.normal(jax.random.PRNGKey(8), (31, 31))
    np.testing.assert_allclose(P(uc), prolong(uc, 31), rtol=0, atol=1e-14)
    np.testing.assert_allclose(R(r), restrict(r), rtol=0, atol=1e-14)
    # on log-normal k (σ = 3, about twelve e-folds) the flux-following P needs
    # far fewer CG iterations than multilinear Galerkin levels (products 202
    # against 379 at 63², 309 against 1127 at 255²), to the true residual
    n = 63
    k = jnp.asarray(ij.gallery.lognormal_coefficient(n, 3.0, 4, 0))
    A, b = ij.gallery.Poisson2D(k), jnp.ones((n, n))
    iterations = {i: galerkin_cg_steps(A, b, i) for i in ("multilinear", "operator")}
    assert iterations["operator"] * 1.5 < iterations["multilinear"], iterations
    with pytest.raises(ValueError, match="`interpolation`='operator' needs"):
        Multigrid(interpolation="operator")
    with pytest.raises(ValueError, match="`interpolation` must be"):
        Multigrid(coarsening="galerkin", interpolation="cubic")
    # a transfer costs its classes' terms at their own nodes (2 an edge node,
    # 8 a centre), not a stencil over the grid: on 63² (levels 63, 31, and a
    # dense 15²) V(1,1) counts 2 sweeps, a residual and 2 transfers of 9-point
    # terms on the fine level, 3 sweeps' worth of 9-point products below
    from iterjax.linear.multigrid import transfer_terms

    assert transfer_terms(5, 2) == (2 * 3 * 2 + 2 * 3 * 2 + 8 * 9) / 25
    fine = ij.gallery.Poisson2D(jnp.ones((63, 63)))
    mg = Multigrid(coarsening="galerkin", interpolation="operator")
    level = (31 / 63) ** 2 * 9 / 5
    want = (
        5
        + 2 * transfer_terms(63, 2) / 5
        + 3 * level
        + 2 * level * transfer_terms(31, 2) / 9
    )
    build, per_apply = cycle_counts(mg, fine)
    assert per_apply == math.ceil(want)
    # the build: the fine stencil probed (9), each Galerkin level probed (9
    # products of the level above and 9 of each transfer), the dense 15² bottom
    transfers = 2 * transfer_terms(63, 2) / 5 + level * 2 * transfer_terms(31, 2) / 9
    bottom = 225 * (15 / 63) ** 2 * 9 / 5
    assert build == math.ceil(bottom + 9 + 9 * (1 + level) + 9 * transfers)


def test_operator_dependent_interpolation_in_3d_is_trilinear_and_follows_rough_k():
    from iterjax.linear.multigrid import operator_transfer, prolong, restrict

    A = ij.gallery.Poisson3D(jnp.ones((15, 15, 15)))
    R, P = operator_transfer(Stencil.probe(A, 15, jnp.float64, 3))
    uc = jax.random.normal(jax.random.PRNGKey(7), (7, 7, 7))
    r = jax.random.normal(jax.random.PRNGKey(8), (15, 15, 15))
    R, P = jax.jit(R), jax.jit(P)  # (eagerly: dozens of small programs)
    np.testing.assert_allclose(P(uc), prolong(uc, 15), rtol=0, atol=1e-13)
    np.testing.assert_allclose(R(r), restrict(r), rtol=0, atol=1e-13)
    # on any field a coarse cell's centre solves its own 27-point equation:
    # A P u_c vanishes there (and R is P's transpose over 8)
    k = jnp.asarray(ij.gallery.lognormal_coefficient(15, 2.0, 3, 1, ndim=3))
    A = ij.gallery.Poisson3D(k)
    R, P = map(jax.jit, operator_transfer(Stencil.probe(A, 15, jnp.float64, 3)))
    residual = A(P(uc))
    centres = residual[::2, ::2, ::2]
    assert float(jnp.max(jnp.abs(centres))) < 1e-12 * float(jnp.max(jnp.abs(residual)))
    np.testing.assert_allclose(jnp.vdot(R(r), uc), jnp.vdot(r, P(uc)) / 8, rtol=1e-12)
    # (CG with it converges to dense solves on adversarial fields in 3-D:
    # tests/test_honest.py; its compile takes ~6 s, so no second solve here)


def test_3d_galerkin_levels_are_27_point_stencils_that_follow_rough_fields():
    from iterjax.linear.multigrid import prolong, restrict

    k = ij.gallery.lognormal_coefficient(15, 2.0, 3, 0, ndim=3)
    A = ij.gallery.Poisson3D(jnp.asarray(k))
    G = Stencil.galerkin(A, 15)
    assert G.w.shape == (7, 7, 7, 3, 3, 3) and G.ndim == 3
    uc, vc = jax.random.normal(jax.random.PRNGKey(6), (2, 7, 7, 7))
    np.testing.assert_allclose(G(uc), restrict(A(prolong(uc, 15))), rtol=1e-10)
    np.testing.assert_allclose(jnp.vdot(G(uc), vc), jnp.vdot(uc, G(vc)), rtol=1e-12)
    np.testing.assert_allclose(
        Stencil.probe(A, 15, uc.dtype, 3)(prolong(uc, 15)),
        A(prolong(uc, 15)),
        rtol=1e-12,
    )
    # eight-colour Gauss-Seidel sweeps converge to the solve
    b = jnp.ones((7, 7, 7))
    x = jax.lax.fori_loop(0, 400, lambda _, x: G.sweep(x, b, 1.0), jnp.zeros_like(b))
    np.testing.assert_allclose(G(x), b, rtol=1e-8, atol=1e-8)
    # a cycle's products weigh each level by its nodes and stencil points: at
    # 31³ (levels 31, 15 and a dense 7³) the 15³ level costs (15/31)³ of a
    # fine product, times 27/7 on a Galerkin level, whose 8-colour sweep
    # evaluates its stencil once (a red-black sweep twice)
    fine = ij.gallery.Poisson3D(jnp.ones((31, 31, 31)))
    level = (15 / 31) ** 3
    for coarsening, per_level in (
        ("rediscretise", 5 * level),
        ("galerkin", 3 * level * 27 / 7),
    ):
        build, per_apply = cycle_counts(Multigrid(coarsening=coarsening), fine)
        assert per_apply == math.ceil(5 + per_level)
    assert build == math.ceil(343 * (7 / 31) ** 3 * 27 / 7 + 27 * (1 + level * 27 / 7))
    # on a rough field (σ = 2) CG + Galerkin V(1,1) needs half the iterations
    # of rediscretised levels (12 against 24 at 15³; 19 against 48 at 31³) and
    # reaches the true residual; at 15³ probing the levels costs more products
    # than that saves (239 against 184), at 31³ less (214 against 346)
    n = 15
    k = jnp.asarray(ij.gallery.lognormal_coefficient(n, 2.0, 4, 0, ndim=3))
    A, b = ij.gallery.Poisson3D(k), jnp.ones((n, n, n))
    iterations = {}
    for coarsening in ("rediscretise", "galerkin"):
        mg = Multigrid(coarsening=coarsening)
        cg = ij.CG(rtol=1e-8, preconditioner=mg)
        x, stats = jax.jit(lambda b, cg=cg: cg.solve_with_stats(A, b))(b)
        assert bool(stats.converged)
        assert float(jnp.linalg.norm(b - A(x)) / jnp.linalg.norm(b)) <= 1e-8
        build, per_apply = cycle_counts(mg, A)  # CG: per_apply at the start
        steps = (int(stats.num_matvecs) - build - per_apply) / (1 + per_apply)
        iterations[coarsening] = steps
    assert iterations["galerkin"] * 1.5 < iterations["rediscretise"], iterations


@pytest.mark.parametrize("seed", range(4))
def test_truncated_cg_returns_a_descent_step_where_cg_gives_nan(seed):
    # Newton-CG's inner loop: on a symmetric indefinite A, CG(indefinite=
    # "truncate") returns the CG iterate before the first p·Ap <= 0 (the same
    # as CG capped one step earlier), or b when the first step meets it; each
    # lowers the model q(x) = ½xᵀAx - bᵀx below q(0) = 0 (a descent direction
    # of L for b = -∇L, A = ∇²L). Plain CG says NaN; both report a breakdown.
    rng = np.random.default_rng(seed)
    Q = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    A = jnp.asarray(Q @ np.diag([-3.0, -0.5, 0.1, 1.0, 2.0, 5.0]) @ Q.T)
    b = jnp.asarray(rng.normal(size=6))
    truncated = ij.CG(indefinite="truncate")
    x, stats = truncated.solve_with_stats(A, b)
    plain_x, plain = ij.CG().solve_with_stats(A, b)
    assert bool(stats.breakdown) and bool(plain.breakdown)
    assert not bool(stats.converged) and bool(jnp.all(jnp.isnan(plain_x)))
    assert float(0.5 * x @ A @ x - b @ x) < 0 and float(b @ x) > 0
    k = int(stats.num_matvecs) - 1  # the steps before the breakdown
    if k:
        np.testing.assert_allclose(x, ij.CG(max_steps=k).solve(A, b), rtol=1e-12)
    else:
        np.testing.assert_array_equal(x, b)
    # a negative definite A: the first step breaks down, x = b
    np.testing.assert_array_equal(truncated.solve(-jnp.eye(6), b), b)
    # positive definite: the same solve as plain CG, bitwise
    spd_A = A + 4 * jnp.eye(6)
    np.testing.assert_array_equal(truncated.solve(spd_A, b), ij.CG().solve(spd_A, b))
    with pytest.raises(ValueError, match="indefinite"):
        ij.CG(indefinite="stop")
