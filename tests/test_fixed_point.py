"""Forward results of every solver against scipy / closed forms (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ALL_SOLVERS, IDS, PROBLEMS, reference

import iterjax as ij
from iterjax.experiments.common import problems
from iterjax.experiments.halpern_vs_picard import disjoint_balls
from iterjax.fixed_point.halpern import anchor_weight
from iterjax.internal import optax_init, optax_step


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=IDS)
def test_converges_to_reference(solver, problem):
    fn, args, y0 = PROBLEMS[problem]()
    sol = ij.fixed_point(fn, y0, args, solver=solver, atol=1e-10, max_steps=2000)
    assert bool(sol.converged), (sol.num_steps, sol.residual)
    assert int(sol.result) == 0
    assert float(sol.residual) <= 1e-10
    expected = reference(fn, y0, args)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=0),
        sol.value,
        expected,
    )


def test_residual_is_that_of_value():
    fn, args, y0 = PROBLEMS["tanh"]()
    sol = ij.fixed_point(fn, y0, args, solver=ij.Anderson(), atol=1e-8)
    true = jnp.max(jnp.abs(fn(sol.value, args) - sol.value))
    np.testing.assert_allclose(sol.residual, true, rtol=1e-12)


def test_accelerated_solvers_beat_picard_on_slow_problem():
    fn, args, y0 = PROBLEMS["slow"]()
    steps = {
        type(s).__name__: int(
            ij.fixed_point(fn, y0, args, solver=s, atol=1e-8, max_steps=5000).num_steps
        )
        for s in [ij.Picard(), ij.Anderson(), ij.Broyden(), ij.Newton()]
    }
    assert steps["Picard"] > 150, steps
    assert steps["Anderson"] < steps["Picard"] / 4, steps
    assert steps["Broyden"] < steps["Picard"] / 4, steps
    assert steps["Newton"] <= 8


def test_rtol_criterion():
    fn = lambda y, a: 0.5 * y + a
    a = jnp.array([1.0, 1000.0])
    sol = ij.fixed_point(fn, jnp.zeros(2), a, solver=ij.Picard(), atol=0.0, rtol=1e-6)
    assert bool(sol.converged)
    r = jnp.abs(fn(sol.value, a) - sol.value)
    assert bool(jnp.all(r <= 1e-6 * jnp.abs(sol.value)))


def test_root_newton_and_others():
    F = lambda y, a: y**3 + y - a
    a = jnp.array([0.5, 2.0, 10.0])
    for solver in [ij.Newton(), ij.Broyden()]:
        sol = ij.root(F, jnp.ones(3), a, solver=solver, atol=1e-12)
        assert bool(sol.converged), solver
        np.testing.assert_allclose(F(sol.value, a), 0.0, atol=1e-10)
        np.testing.assert_allclose(
            sol.residual, jnp.max(jnp.abs(F(sol.value, a))), atol=1e-15
        )


def test_newton_quadratic_convergence():
    sol = ij.root(
        lambda y, a: y**2 - a, jnp.array(1.0), jnp.array(2.0), atol=1e-14, trace=True
    )
    tr = np.asarray(sol.trace[: int(sol.num_steps)])
    assert int(sol.num_steps) <= 6
    # Each error roughly squares the previous one.
    assert tr[2] < 10 * tr[1] ** 2
    np.testing.assert_allclose(sol.value, np.sqrt(2.0), rtol=1e-14)


def _pseudo_huber_gradient(y, _):
    """∇ of √(1 + y²): full Newton steps y -> -y³ diverge from |y| > 1."""
    return y / jnp.sqrt(1 + y**2)


def test_damped_newton_step_is_the_schedule():
    y0, M = 5.0, 0.7
    orders = jnp.array([2.0, 3.0, 4.0])  # a leaf: the three orders in one vmap

    @jax.jit
    @jax.vmap
    def one_step(order):
        solver = ij.Newton(smoothness=M, order=order)
        kw = dict(solver=solver, atol=0.0, max_steps=1)
        return ij.root(_pseudo_huber_gradient, jnp.array(y0), None, **kw).value

    s = -y0 * (1 + y0**2)  # -F/F'
    decrement = np.sqrt(y0 / np.sqrt(1 + y0**2) * -s)  # √(∇Lᵀ H⁻¹ ∇L)
    q = np.asarray(orders)
    theta = (9 * M) ** (1 / (q - 1)) * decrement ** ((q - 2) / (q - 1))
    np.testing.assert_allclose(one_step(orders), y0 + s / (1 + theta), rtol=1e-12)


def test_damped_newton_converges_where_full_steps_diverge():
    y0 = jnp.array([5.0, -3.0, 8.0])
    kw = dict(atol=1e-10, max_steps=300)

    @jax.jit
    def solve(smoothness, order, y0=y0):
        solver = ij.Newton(smoothness=smoothness, order=order)
        return ij.root(_pseudo_huber_gradient, y0, None, solver=solver, **kw)

    assert not bool(solve(0.0, 4.0).converged)  # smoothness 0: full steps

    # smoothness and order are leaves: a grid of them is one vmapped solve
    grid = jax.vmap(solve)(jnp.array([10.0, 100.0, 10.0]), jnp.array([4.0, 4.0, 3.0]))
    assert bool(jnp.all(grid.converged)), grid.num_steps
    true = jnp.max(jnp.abs(_pseudo_huber_gradient(grid.value, None)), axis=1)
    assert bool(jnp.all(true <= 1e-10)), true
    # a larger M takes shorter steps: more of them
    assert int(grid.num_steps[1]) > int(grid.num_steps[0])
    # smoothness 0 is Newton's full step, to the bit
    near = jax.jit(lambda y: ij.root(_pseudo_huber_gradient, y, None, **kw))
    np.testing.assert_array_equal(
        near(0.5 * jnp.ones(3)).value, solve(0.0, 4.0, 0.5 * jnp.ones(3)).value
    )


def test_damping_schedule_and_line_search_converge_on_the_studys_logistic_start():
    fn, args, y0 = problems.logistic(dim=16)

    @jax.jit
    def solve(solver):
        return ij.fixed_point(fn, y0, args, solver=solver, atol=1e-8, max_steps=100)

    assert not bool(solve(ij.Newton()).converged)
    for solver in [ij.Newton(smoothness=0.1), ij.Backtracking(ij.Newton())]:
        sol = solve(solver)
        assert bool(sol.converged), solver
        true = jnp.max(jnp.abs(fn(sol.value, args) - sol.value))
        assert float(true) <= 1e-8


@pytest.mark.parametrize("adjoint", [ij.ImplicitAdjoint(), ij.UnrolledAdjoint()])
def test_damped_newton_gradient_is_the_closed_form(adjoint):
    # F(y, a) = y / √(1 + y²) - a: y* = a / √(1 - a²), dy*/da = (1 - a²)^(-3/2)
    F = lambda y, a: _pseudo_huber_gradient(y, None) - a
    solver = ij.Newton(smoothness=10.0)

    @jax.jit
    @jax.grad
    def root(a):
        kw = dict(solver=solver, adjoint=adjoint, atol=1e-13, max_steps=200)
        return ij.root(F, jnp.array(5.0), a, **kw).value

    a = 0.3
    np.testing.assert_allclose(root(a), (1 - a**2) ** -1.5, rtol=1e-9)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [(dict(smoothness=-1.0), "smoothness"), (dict(order=5.0), "order")],
)
def test_damped_newton_rejects_bad_schedules(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ij.Newton(**kwargs)


def _quadratic_gradient_map(kappa=100.0):
    """Gradient descent's map y - (A y - b) / L on A = diag(1, κ), L = κ."""
    A = jnp.diag(jnp.array([1.0, kappa]))
    return lambda y, b: y - (A @ y - b) / kappa


def test_nag_gs_steps_are_the_formulas():
    fn = _quadratic_gradient_map()
    b, alpha, mu, gamma = jnp.array([1.0, -2.0]), 0.3, 0.05, 0.7
    y0 = jnp.array([0.5, 0.25])
    x, g = np.asarray(y0), gamma

    def velocity(v, x, g):
        d = np.asarray(fn(x, b)) - x  # -h ∇L(x)
        return (g * v + alpha * mu * x + alpha * d) / (g + alpha * mu)

    # the paper's first step, from v_0 = x_0, does not move x: NAGGS folds it
    # into init (no evaluation spent)
    g = (g + alpha * mu) / (1 + alpha)
    v = velocity(x, x, g)
    for k in range(1, 5):
        x = (x + alpha * v) / (1 + alpha)
        g = (g + alpha * mu) / (1 + alpha)
        v = velocity(v, x, g)
        solver = ij.NAGGS(alpha, mu, gamma)
        sol = ij.fixed_point(fn, y0, b, solver=solver, atol=0.0, max_steps=k)
        np.testing.assert_allclose(sol.value, x, rtol=1e-13)


def test_nag_gs_as_optax_takes_the_solvers_steps():
    fn = _quadratic_gradient_map()
    b, y0 = jnp.array([1.0, -2.0]), jnp.array([3.0, 1.0])
    solver = ij.NAGGS(0.2, mu=0.01, gamma=0.5)
    opt = ij.nag_gs(0.2, mu=0.01, gamma=0.5)
    state, y = optax_init(opt, y0), y0
    for k in range(1, 6):
        grad = y - fn(y, b)  # h ∇L
        y, state = optax_step(opt, grad, state, y)
        want = ij.fixed_point(fn, y0, b, solver=solver, atol=0.0, max_steps=k)
        np.testing.assert_allclose(y, want.value, rtol=1e-13)
    # a schedule of the step count is a learning rate too
    scheduled = ij.nag_gs(optax.constant_schedule(0.2), mu=0.01, gamma=0.5)
    state = optax_init(scheduled, y0)
    for _ in range(5):
        y0, state = optax_step(scheduled, y0 - fn(y0, b), state, y0)
    np.testing.assert_allclose(y0, y, rtol=1e-13)
    # optax's extra arguments (value=, as line searches and Polyak pass) are
    # taken and ignored: the same step
    grad = y - fn(y, b)
    plain = opt.update(grad, state, y)[0]
    extra = opt.update(grad, state, y, value=jnp.sum(y**2))[0]
    np.testing.assert_array_equal(extra, plain)


def test_nag_gs_accelerates_gradient_descent_on_an_ill_conditioned_quadratic():
    fn, b = _quadratic_gradient_map(), jnp.ones(2)
    kw = dict(atol=1e-8, max_steps=5000)
    picard = ij.fixed_point(fn, jnp.zeros(2), b, solver=ij.Picard(), **kw)

    @jax.jit
    @jax.vmap
    def nag_gs(alpha):  # the step size is a leaf: a grid of it is one solve
        solver = ij.NAGGS(alpha, mu=0.01, gamma=0.01)
        return ij.fixed_point(fn, jnp.zeros(2), b, solver=solver, **kw)

    grid = nag_gs(jnp.array([0.05, 0.1, 0.2]))
    assert bool(jnp.all(grid.converged))
    # |residual| <= 1e-8 bounds the error by 1e-8 · L/μ = 1e-6
    error = jnp.abs(grid.value - jnp.array([[1.0, 0.01]]))
    assert bool(jnp.all(error <= 1e-6)), error
    # √κ = 10: at α = 2√(μ/L) about 15x fewer steps than gradient descent
    assert int(picard.num_steps) > 10 * int(grid.num_steps[2])
    assert int(grid.num_steps[0]) > int(grid.num_steps[1]) > int(grid.num_steps[2])


@pytest.mark.parametrize("adjoint", [ij.ImplicitAdjoint(), ij.UnrolledAdjoint()])
def test_nag_gs_gradient_is_the_closed_form(adjoint):
    # y* = A⁻¹ b on gradient descent's map: d(c·y*)/db = A⁻¹ c
    fn, c = _quadratic_gradient_map(kappa=4.0), jnp.array([1.0, -2.0])
    solver = ij.NAGGS(0.5, mu=0.1, gamma=0.1)

    @jax.jit
    @jax.grad
    def grad(b):
        kw = dict(solver=solver, adjoint=adjoint, atol=1e-12, max_steps=2000)
        return c @ ij.fixed_point(fn, jnp.zeros(2), b, **kw).value

    np.testing.assert_allclose(grad(jnp.ones(2)), c / jnp.array([1.0, 4.0]), rtol=1e-8)


@pytest.mark.parametrize(
    ("make", "name"),
    [
        (lambda: ij.NAGGS(step_size=0.0), "step_size"),
        (lambda: ij.NAGGS(mu=0.0), "mu"),
        (lambda: ij.NAGGS(gamma=-1.0), "gamma"),
        (lambda: ij.nag_gs(-0.1), "learning_rate"),
    ],
)
def test_nag_gs_rejects_bad_hyperparameters(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_complex_linear_fixed_point(getkey):
    n = 6
    cplx = lambda shape: jax.lax.complex(
        jax.random.normal(getkey(), shape), jax.random.normal(getkey(), shape)
    )
    a = cplx((n, n))
    a = a / jnp.linalg.norm(a, 2).astype(a.dtype) * 0.8
    b = cplx((n,))
    expected = jnp.linalg.solve(jnp.eye(n, dtype=a.dtype) - a, b)
    for solver in [ij.Picard(), ij.Anderson(), ij.Broyden(), ij.Newton()]:
        sol = ij.fixed_point(
            lambda y, p: p[0] @ y + p[1],
            jnp.zeros(n, complex),
            (a, b),
            solver=solver,
            atol=1e-11,
        )
        assert bool(sol.converged), solver
        np.testing.assert_allclose(sol.value, expected, atol=1e-9)


def test_halpern_converges_on_nonexpansive_map_where_picard_cycles():
    # A rotation about c is an isometry: Picard cycles forever; the textbook
    # Halpern converges at O(1/k), restarted Halpern linearly (to 1e-10).
    t = 1.0
    rot = jnp.array([[jnp.cos(t), -jnp.sin(t)], [jnp.sin(t), jnp.cos(t)]])
    c = jnp.array([1.0, -2.0])
    fn = lambda y, a: a[0] @ (y - a[1]) + a[1]
    y0 = jnp.array([3.0, 3.0])
    solve = lambda s, atol: ij.fixed_point(
        fn, y0, (rot, c), solver=s, atol=atol, max_steps=3000
    )
    picard = solve(ij.Picard(), 1e-3)
    textbook = solve(ij.Halpern(restart=None, contraction=1.0), 1e-3)
    restarted = solve(ij.Halpern(), 1e-10)
    assert not bool(picard.converged)
    assert bool(textbook.converged)
    np.testing.assert_allclose(textbook.value, c, atol=1e-2)
    assert bool(restarted.converged)
    assert int(restarted.num_steps) < int(textbook.num_steps)  # 1e-10 vs 1e-3
    assert int(restarted.stats["restarts"]) > 0
    np.testing.assert_allclose(restarted.value, c, atol=1e-9)
    # the secant estimate of the contraction factor finds the isometry
    np.testing.assert_allclose(restarted.stats["contraction"], 1.0, atol=1e-12)


def test_halpern_rate_is_one_over_k():
    t = 2.0
    rot = jnp.array([[jnp.cos(t), -jnp.sin(t)], [jnp.sin(t), jnp.cos(t)]])
    fn = lambda y, a: a @ y
    sol = ij.fixed_point(
        fn,
        jnp.array([1.0, 0.0]),
        rot,
        solver=ij.Halpern(restart=None, contraction=1.0),
        atol=0.0,
        max_steps=1000,
        trace=True,
    )
    tr = np.asarray(sol.trace)
    # k * residual stays bounded (O(1/k)) and the residual keeps shrinking.
    assert tr[999] < tr[99] / 3
    assert np.max(np.arange(1, 1001)[100:] * tr[100:]) < 10


@pytest.mark.parametrize("problem", ["cos", "tanh", "pytree"])
def test_restarted_halpern_within_twice_picards_steps(problem):
    if problem == "cos":
        fn, args, y0 = (lambda y, a: jnp.cos(y)), None, jnp.array(1.0)
    else:
        fn, args, y0 = PROBLEMS[problem]()
    steps = {}
    for name, solver in [("picard", ij.Picard()), ("halpern", ij.Halpern())]:
        sol = ij.fixed_point(fn, y0, args, solver=solver, atol=1e-10, max_steps=2000)
        assert bool(sol.converged), name
        steps[name] = int(sol.num_steps)
    assert steps["halpern"] <= 2 * steps["picard"], steps
    # the textbook form, for contrast, is sublinear: far from 1e-10
    textbook = ij.Halpern(restart=None, contraction=1.0)
    sol = ij.fixed_point(fn, y0, args, solver=textbook, atol=1e-10, max_steps=2000)
    assert not bool(sol.converged)


def test_halpern_with_known_contraction_is_oc_halpern():
    # β_k = 1/φ_{k+1}, φ_k = Σ_{i<=k} γ^{-2i} (Park & Ryu 2022), checked against
    # the sum itself; γ = 1 gives 1/(k+2).
    k = jnp.arange(30)
    for gamma in [0.3, 0.9, 0.999999]:
        phi = np.array([sum(gamma ** (-2.0 * i) for i in range(j + 2)) for j in k])
        np.testing.assert_allclose(
            anchor_weight(jnp.array(gamma), k), 1 / phi, rtol=1e-9
        )
    np.testing.assert_allclose(
        anchor_weight(jnp.array(1.0), k), 1 / (np.arange(30) + 2)
    )
    assert float(anchor_weight(jnp.array(0.0), jnp.int32(0))) == 0.0
    assert float(anchor_weight(jnp.array(1e-3), jnp.int32(400))) == 0.0  # no NaN
    fn, args, y0 = PROBLEMS["tanh"]()
    sol = ij.fixed_point(
        fn, y0, args, solver=ij.Halpern(contraction=0.8), atol=1e-10, max_steps=500
    )
    assert bool(sol.converged)


def test_trace_layout():
    fn, args, y0 = PROBLEMS["tanh"]()
    sol = ij.fixed_point(
        fn, y0, args, solver=ij.Picard(), atol=1e-8, max_steps=100, trace=True
    )
    k = int(sol.num_steps)
    assert sol.trace.shape == (100,)
    assert np.all(np.isfinite(sol.trace[:k]))
    assert np.all(np.isnan(sol.trace[k:]))
    np.testing.assert_allclose(sol.trace[k - 1], sol.residual)
    assert ij.fixed_point(fn, y0, args).trace is None


def test_already_converged_initial_guess_takes_no_step():
    fn, args, y0 = PROBLEMS["tanh"]()
    y_star = ij.fixed_point(fn, y0, args, atol=1e-12).value
    sol = ij.fixed_point(fn, y_star, args, atol=1e-8)
    assert int(sol.num_steps) == 0 and bool(sol.converged)


class _EagerPicard(ij.Picard):
    def lazy_init(self, y0):
        return None


@pytest.mark.parametrize("damping", [1.0, 0.5])
def test_lazy_init_is_the_eager_init_run_inside_the_loop(damping):
    """Picard's initial evaluation runs as the loop's first iteration: same
    solution, step count, residual and trace as evaluating before the loop, also
    from a converged y0 and when max_steps runs out."""
    fn, args, y0 = PROBLEMS["tanh"]()
    lazy = ij.Picard(damping)
    state = lazy.lazy_init(y0)
    y, state = lazy.step(fn, y0, args, state)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(state.residual, lazy.init(fn, y0, args).residual)
    y_star = ij.fixed_point(fn, y0, args, atol=1e-13).value
    for start, max_steps in [(y0, 100), (y_star, 100), (y0, 3), (y0, 1)]:
        got, want = (
            jax.jit(
                lambda y, s=s: ij.fixed_point(
                    fn, y, args, solver=s, atol=1e-9, max_steps=max_steps, trace=True
                )
            )(start)
            for s in (lazy, _EagerPicard(damping))
        )
        leaves = jax.tree_util.tree_leaves
        for a, b in zip(leaves(got), leaves(want), strict=True):
            np.testing.assert_array_equal(a, b)
    assert int(got.num_steps) == 1 and not bool(got.converged)


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=IDS)
def test_float32_dtype_preserved(solver):
    fn, args, y0 = PROBLEMS["tanh"]()
    args32 = jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), args)
    sol = ij.fixed_point(
        fn, y0.astype(jnp.float32), args32, solver=solver, atol=1e-5, max_steps=300
    )
    assert sol.value.dtype == jnp.float32
    assert sol.residual.dtype == jnp.float32
    assert bool(sol.converged)


def test_linear_solvers_against_numpy(getkey):
    n = 8
    m = jax.random.normal(getkey(), (n, n))
    spd = m @ m.T + n * jnp.eye(n)
    contraction = 0.5 * m / jnp.linalg.norm(m, 2)  # A = I - contraction
    b = jax.random.normal(getkey(), (n,))
    for solver in [ij.CG(rtol=1e-12), ij.GMRES(rtol=1e-12), ij.BiCGStab(rtol=1e-12)]:
        x = solver.solve(lambda v: spd @ v, b)
        np.testing.assert_allclose(x, jnp.linalg.solve(spd, b), rtol=1e-8)
    a = jnp.eye(n) - contraction
    exact = jnp.linalg.solve(a, b)
    x = ij.Richardson(atol=1e-13).solve(lambda v: a @ v, b)
    np.testing.assert_allclose(x, exact, atol=1e-11)
    # Neumann with k terms has error |contraction|^(k+1) |x|.
    for k, tol in [(5, 0.5**6), (40, 1e-11)]:
        x = ij.Neumann(terms=k).solve(lambda v: a @ v, b)
        assert (
            float(jnp.linalg.norm(x - exact)) <= tol * float(jnp.linalg.norm(exact)) * 2
        )


def test_norm_option_changes_stopping_rule_and_reported_residual():
    fn, args, y0 = PROBLEMS["tanh"]()
    kw = dict(solver=ij.Picard(), atol=1e-6)
    inf = ij.fixed_point(fn, y0, args, **kw)
    two = ij.fixed_point(fn, y0, args, norm=ij.two_norm, **kw)
    r = fn(two.value, args) - two.value
    np.testing.assert_allclose(two.residual, jnp.linalg.norm(r), rtol=1e-12)
    assert float(two.residual) <= 1e-6
    assert int(two.num_steps) >= int(inf.num_steps)
    rms = ij.fixed_point(fn, y0, args, norm=ij.rms_norm, **kw)
    r = fn(rms.value, args) - rms.value
    np.testing.assert_allclose(rms.residual, jnp.sqrt(jnp.mean(r**2)), rtol=1e-12)


def test_krylov_default_tolerance_is_dtype_aware():
    from iterjax.linear.krylov import default_rtol

    assert default_rtol(jnp.zeros(3)) == 1e-8
    assert 1e-7 < default_rtol(jnp.zeros(3, jnp.float32)) < 1e-5


# --- Infeasibility: the infimal displacement vector v and the drifting flag.


def test_infeasibility_displacement_estimates():
    dr, v = disjoint_balls()  # its infimal displacement v in closed form
    y0 = jnp.array([1.0, -2.0])
    solve = lambda s, n: ij.fixed_point(dr, y0, solver=s, atol=1e-10, max_steps=n)
    # Halpern's residual: the accelerated estimate, O(1/k)
    sol = solve(ij.Halpern(), 1000)
    assert int(sol.result) == 1 and bool(sol.drifting)
    assert "no fixed point" in sol.message
    np.testing.assert_allclose(sol.displacement, v, atol=1e-3)
    # Picard's normalised iterate (y_k - y_0)/k: also O(1/k), a larger constant
    err = lambda n: float(jnp.max(jnp.abs(solve(ij.Picard(), n).displacement - v)))
    assert err(1000) < 5e-3 and err(2000) < 0.6 * err(1000)
    assert bool(solve(ij.Picard(), 1000).drifting)


def test_feasible_problems_do_not_drift():
    fn, args, y0 = PROBLEMS["tanh"]()
    sol = ij.fixed_point(fn, y0, args, atol=1e-10)
    assert bool(sol.converged) and not bool(sol.drifting)
    # A rotation has a fixed point: Picard cycles around it without drifting.
    rot = lambda y, a: jnp.stack([-y[1], y[0]])
    cyc = ij.fixed_point(rot, jnp.ones(2), solver=ij.Picard(), max_steps=500)
    assert not bool(cyc.converged) and not bool(cyc.drifting)
    np.testing.assert_allclose(cyc.displacement, 0.0, atol=1e-2)
    # slow but feasible: the residual falls over the run, so it is not drifting
    slow = lambda y, a: 0.995 * y + 1.0
    sol = ij.fixed_point(slow, jnp.array(0.0), solver=ij.Picard(), max_steps=1000)
    assert not bool(sol.converged) and not bool(sol.drifting)
    assert "no fixed point" not in sol.message


def test_drifting_per_lane_under_vmap():
    # lane 0: a contraction (converges); lane 1: a translation by 0.3 (drifts)
    fn = lambda y, a: a[0] * y + a[1]
    a = jnp.array([0.5, 1.0]), jnp.array([1.0, 0.3])
    solve = lambda a: ij.fixed_point(fn, jnp.zeros(2), a, solver=ij.Picard())
    out = jax.vmap(solve)(a)
    np.testing.assert_array_equal(out.converged, [True, False])
    np.testing.assert_array_equal(out.drifting, [False, True])
    np.testing.assert_allclose(out.displacement[1], [0.3, 0.3], rtol=1e-12)


@pytest.mark.parametrize("every", [1, 2, 3])
def test_lazy_newton_same_solution_fewer_jacobians(every):
    fn, args, y0 = PROBLEMS["tanh"]()
    newton = ij.fixed_point(fn, y0, args, solver=ij.Newton(), atol=1e-12)
    lazy = ij.fixed_point(
        fn, y0, args, solver=ij.LazyNewton(every), atol=1e-12, max_steps=100
    )
    assert bool(lazy.converged)
    np.testing.assert_allclose(lazy.value, newton.value, atol=1e-11)
    steps, jacobians = int(lazy.num_steps), int(lazy.stats["jacobians"])
    assert jacobians == -(-steps // every)  # at steps 0, d, 2d, ...
    if every == 1:  # dense Newton: Newton's steps
        assert steps == int(newton.num_steps)


def test_lazy_newton_rejects_bad_period():
    with pytest.raises(ValueError, match="jacobian_every"):
        ij.LazyNewton(0)


def _spd_gradient_map(kappa=100.0, n=6, seed=0):
    """f(y) = y - (A y - b) / L: gradient descent on ½ yᵀAy - bᵀy, the residual's
    Jacobian -A/L with eigenvalues in [1/κ, 1] (A = Q diag Qᵀ)."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.normal(size=(n, n)))
    A = jnp.asarray(q @ np.diag(np.geomspace(1.0, kappa, n)) @ q.T)
    return (lambda y, b: y - (A @ y - b) / kappa), A, jnp.asarray(rng.normal(size=n))


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_momentum_steps_are_the_formulas(nesterov):
    fn, _, b = _spd_gradient_map()
    alpha, beta = 1.3, 0.6
    solver = ij.Momentum(alpha, beta, nesterov)
    y_prev, y = (
        jnp.zeros(6),
        jnp.zeros(6),
    )  # heavy ball: y_{k-1}, y_k; Nesterov: y_k, z_k
    for k in range(1, 6):
        sol = ij.fixed_point(fn, jnp.zeros(6), b, solver=solver, max_steps=k, atol=0.0)
        moved = y + alpha * (fn(y, b) - y)
        if nesterov:
            y, y_prev = moved + beta * (moved - y_prev), moved
        else:
            y, y_prev = moved + beta * (y - y_prev), y
        np.testing.assert_allclose(sol.value, y, rtol=1e-13, atol=1e-15)
        np.testing.assert_allclose(
            sol.residual, jnp.max(jnp.abs(fn(y, b) - y)), rtol=1e-12
        )


def test_momentum_without_momentum_is_damped_picard():
    fn, _, b = _spd_gradient_map()
    kw = dict(atol=1e-10, max_steps=5000, trace=True)
    want = ij.fixed_point(fn, jnp.zeros(6), b, solver=ij.Picard(0.7), **kw)
    for nesterov in (False, True):
        solver = ij.Momentum(0.7, 0.0, nesterov)
        got = ij.fixed_point(fn, jnp.zeros(6), b, solver=solver, **kw)
        assert int(got.num_steps) == int(want.num_steps)
        np.testing.assert_allclose(got.trace, want.trace, rtol=1e-12)
        np.testing.assert_allclose(got.value, want.value, rtol=1e-12)


def test_heavy_ball_takes_sqrt_kappa_fewer_steps_on_a_quadratic():
    # κ = 100: the optimal heavy ball contracts at (√κ-1)/(√κ+1) = 0.818 a step,
    # the optimally damped Picard at (κ-1)/(κ+1) = 0.980: ~10x fewer steps
    kappa = 100.0
    fn, A, b = _spd_gradient_map(kappa)
    mu, L = 1 / kappa, 1.0
    alpha = 4 / (np.sqrt(L) + np.sqrt(mu)) ** 2
    beta = ((np.sqrt(L) - np.sqrt(mu)) / (np.sqrt(L) + np.sqrt(mu))) ** 2
    damped = lambda y, b: y + 2 / (L + mu) * (fn(y, b) - y)  # Picard's best
    kw = dict(atol=1e-10, max_steps=5000)
    picard = ij.fixed_point(damped, jnp.zeros(6), b, solver=ij.Picard(), **kw)
    ball = ij.fixed_point(fn, jnp.zeros(6), b, solver=ij.Momentum(alpha, beta), **kw)
    nag = ij.fixed_point(fn, jnp.zeros(6), b, solver=ij.Momentum(1.0, 0.8, True), **kw)
    assert bool(picard.converged) and bool(ball.converged) and bool(nag.converged)
    assert int(ball.num_steps) * 6 < int(picard.num_steps)
    assert int(nag.num_steps) * 3 < int(picard.num_steps)
    x = jnp.linalg.solve(A, b)
    for sol in (ball, nag):
        np.testing.assert_allclose(sol.value, x, atol=1e-7 * kappa)


def test_nesterov_outside_its_region_is_reported_not_converged():
    # a residual eigenvalue h = 1.97 with α = 1, β = 0.3: α h (1 + 2β) = 3.15 >
    # 2 (1 + β) = 2.6, so Nesterov diverges (heavy ball, at 1.97 < 2.6, converges)
    fn = lambda y, a: -0.97 * y + a
    kw = dict(atol=1e-10, max_steps=400)
    bad = ij.fixed_point(
        fn, jnp.array(0.0), 1.0, solver=ij.Momentum(nesterov=True), **kw
    )
    good = ij.fixed_point(fn, jnp.array(0.0), 1.0, solver=ij.Momentum(), **kw)
    assert not bool(bad.converged) and bool(good.converged)
    np.testing.assert_allclose(good.value, 1 / 1.97, rtol=1e-9)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(damping=0.0), "damping"),
        (dict(damping=-1.0), "damping"),
        (dict(momentum=1.0), "momentum"),
        (dict(momentum=-0.1), "momentum"),
        (dict(nesterov=1), "nesterov"),
    ],
)
def test_momentum_rejects_bad_hyperparameters(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        ij.Momentum(**kwargs)


def test_async_coordinates_without_delay_or_blocks_is_picard():
    fn, args, y0 = PROBLEMS["tanh"]()
    kw = dict(atol=1e-10, max_steps=500, trace=True)
    got = ij.fixed_point(fn, y0, args, solver=ij.AsyncCoordinates(1.0, 0, 0.7), **kw)
    want = ij.fixed_point(fn, y0, args, solver=ij.Picard(0.7), **kw)
    assert int(got.num_steps) == int(want.num_steps)
    np.testing.assert_allclose(got.trace, want.trace, rtol=1e-12)


def test_async_coordinates_steps_are_stale_random_blocks():
    # by hand: the same block draws, f at the iterate `delay` steps back
    W = jnp.asarray(np.random.default_rng(0).normal(size=(6, 6))) * 0.1
    fn = lambda y, x: jnp.tanh(W @ y + x)
    x = jnp.linspace(-1.0, 1.0, 6)
    solver = ij.AsyncCoordinates(fraction=0.4, delay=2, damping=0.9, seed=3)
    history, key = [jnp.zeros(6)], jax.random.key(3)
    for k in range(6):
        key, sub = jax.random.split(key)
        block = jax.random.bernoulli(sub, 0.4, (6,))
        y, stale = history[-1], history[-1 - min(2, k)]
        history.append(jnp.where(block, y + 0.9 * (fn(stale, x) - y), y))
        sol = ij.fixed_point(
            fn, jnp.zeros(6), x, solver=solver, max_steps=k + 1, atol=0
        )
        np.testing.assert_allclose(sol.value, history[-1], rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("delay", [0, 3, 10])
def test_async_coordinates_converge_on_a_max_norm_contraction(delay):
    # ‖W‖_∞ = 0.9: f is a max-norm contraction, so any bounded delay converges
    rng = np.random.default_rng(1)
    W = rng.normal(size=(10, 10))
    W = jnp.asarray(0.9 * W / np.abs(W).sum(1, keepdims=True))
    fn = lambda y, x: jnp.tanh(W @ y + x)
    x = jnp.asarray(rng.normal(size=10))
    kw = dict(atol=1e-10, max_steps=5000)
    solve = jax.jit(
        lambda x: ij.fixed_point(
            fn, jnp.zeros(10), x, **kw, solver=ij.AsyncCoordinates(0.3, delay)
        )
    )
    sol = solve(x)
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.value, reference(fn, jnp.zeros(10), x), atol=1e-9)
    picard = ij.fixed_point(fn, jnp.zeros(10), x, solver=ij.Picard(), **kw)
    assert int(sol.num_steps) > int(picard.num_steps)  # a third of the work a step
    # vmapped: per-element step counts; the implicit gradient is Picard's
    batch = jax.vmap(solve)(jnp.stack([x, 0.5 * x]))
    assert int(batch.num_steps[0]) == int(sol.num_steps)
    loss = lambda x, s: jnp.sum(
        ij.fixed_point(fn, jnp.zeros(10), x, solver=s, **kw).value
    )
    np.testing.assert_allclose(
        jax.grad(loss)(x, ij.AsyncCoordinates(0.3, delay)),
        jax.grad(loss)(x, ij.Picard()),
        rtol=1e-8,
    )


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(fraction=0.0), "fraction"),
        (dict(fraction=1.5), "fraction"),
        (dict(delay=-1), "delay"),
        (dict(delay=1.5), "delay"),
        (dict(damping=0.0), "damping"),
        (dict(seed=-2), "seed"),
    ],
)
def test_async_coordinates_reject_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ij.AsyncCoordinates(**kwargs)
