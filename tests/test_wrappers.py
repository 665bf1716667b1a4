"""Every wrapper (Relaxed, Restarted, Safeguarded, Switched, Backtracking) around
every solver, under
jit, vmap and grad; and what each wrapper does."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import PROBLEMS, SOLVERS, WRAPPERS, reference

import iterjax as ij

COMBOS = [(w, s) for w in WRAPPERS for s in SOLVERS]


def _batch(args, scales):
    w, x = args
    return jnp.stack([s * w for s in scales]), jnp.stack([x * (1 + s) for s in scales])


def _loss(solve, a, adjoint):
    return jnp.sum(jnp.sin(solve(a, adjoint).value))


@functools.cache
def _implicit_gradient():
    """The gradient every wrapped solver's unrolled one must match: the implicit
    one (it depends on the fixed point only), computed once for the module."""
    fn, args, y0 = PROBLEMS["tanh"]()
    solve = lambda a, adjoint: ij.fixed_point(
        fn, y0, a, atol=1e-12, max_steps=300, adjoint=adjoint
    )
    return jax.grad(lambda a: _loss(solve, a, ij.ImplicitAdjoint()))(args)


@pytest.mark.parametrize("wrapper,solver", COMBOS, ids=[f"{w}-{s}" for w, s in COMBOS])
def test_wrapper_under_jit_vmap_and_grad(wrapper, solver):
    fn, args, y0 = PROBLEMS["tanh"]()
    wrapped = WRAPPERS[wrapper](SOLVERS[solver])
    solve = lambda a, adjoint=ij.ImplicitAdjoint(): ij.fixed_point(
        fn, y0, a, solver=wrapped, atol=1e-10, max_steps=300, adjoint=adjoint
    )
    # vmap: per-element step counts and values, as the single solves give them
    batched = _batch(args, [0.2, 1.0])
    out = jax.jit(jax.vmap(solve))(batched)
    single = jax.jit(solve)
    for i in range(2):
        lane = jax.tree_util.tree_map(lambda b: b[i], batched)
        one = single(lane)
        assert bool(one.converged), (wrapper, solver, one.num_steps)
        assert int(out.num_steps[i]) == int(one.num_steps)
        np.testing.assert_allclose(out.value[i], one.value, atol=1e-13, rtol=0)
    assert int(out.num_steps[0]) < int(out.num_steps[1])
    np.testing.assert_allclose(one.value, reference(fn, y0, lane), atol=1e-9)
    # grad: unrolled through the wrapper's own steps, against the implicit one
    unrolled = jax.jit(jax.grad(lambda a: _loss(solve, a, ij.UnrolledAdjoint())))(args)
    jax.tree_util.tree_map(
        lambda u, i: np.testing.assert_allclose(u, i, atol=1e-8),
        unrolled,
        _implicit_gradient(),
    )


def test_relaxed_picard_is_krasnoselskii_mann():
    fn, args, y0 = PROBLEMS["slow"]()
    kw = dict(atol=1e-10, max_steps=3000, trace=True)
    relaxed = ij.fixed_point(fn, y0, args, solver=ij.Relaxed(ij.Picard(), 0.6), **kw)
    damped = ij.fixed_point(fn, y0, args, solver=ij.Picard(damping=0.6), **kw)
    assert int(relaxed.num_steps) == int(damped.num_steps)
    np.testing.assert_allclose(relaxed.trace, damped.trace, rtol=1e-9, atol=1e-15)
    # the reported residual is f's, not the relaxed map's
    true = jnp.max(jnp.abs(fn(relaxed.value, args) - relaxed.value))
    # (to rounding: a residual of 1e-10 is a difference of O(1) numbers)
    np.testing.assert_allclose(relaxed.residual, true, rtol=1e-9, atol=1e-15)


def test_relaxed_converges_on_a_rotation():
    rot = lambda y, a: jnp.stack([-y[1], y[0]])
    plain = ij.fixed_point(rot, jnp.ones(2), solver=ij.Picard(), max_steps=500)
    relaxed = ij.Relaxed(ij.Picard(), 0.5)
    sol = ij.fixed_point(rot, jnp.ones(2), solver=relaxed, max_steps=500)
    assert not bool(plain.converged) and bool(sol.converged)


def test_restarted_halpern_is_halperns_own_restarts():
    # The wrapper and Halpern's built-in restarts apply one rule at the same
    # points: the same iterates (to rounding).
    fn, args, y0 = PROBLEMS["slow"]()
    kw = dict(atol=1e-10, max_steps=3000, trace=True)
    builtin = ij.Halpern(contraction=1.0)
    wrapped = ij.Restarted(ij.Halpern(restart=None, contraction=1.0))
    a = ij.fixed_point(fn, y0, args, solver=builtin, **kw)
    b = ij.fixed_point(fn, y0, args, solver=wrapped, **kw)
    assert int(a.stats["restarts"]) == int(b.stats["restarts"]) > 5
    assert int(a.num_steps) == int(b.num_steps)
    np.testing.assert_allclose(a.trace, b.trace, rtol=1e-6)


def test_restarting_a_memoryless_solver_changes_nothing():
    fn, args, y0 = PROBLEMS["slow"]()
    kw = dict(atol=1e-10, max_steps=3000, trace=True)
    plain = ij.fixed_point(fn, y0, args, solver=ij.Picard(), **kw)
    wrapped = ij.fixed_point(fn, y0, args, solver=ij.Restarted(ij.Picard()), **kw)
    assert int(wrapped.stats["restarts"]) > 5
    assert int(wrapped.num_steps) == int(plain.num_steps)
    np.testing.assert_allclose(wrapped.trace, plain.trace, rtol=1e-9)


def test_restart_costs_no_function_evaluation():
    count = []

    def fn(y, a):
        jax.debug.callback(lambda: count.append(1))
        return 0.5 * jnp.cos(y)

    sol = ij.fixed_point(fn, jnp.ones(3), solver=ij.Restarted(ij.Anderson(3)))
    jax.effects_barrier()
    assert int(sol.stats["restarts"]) > 0
    assert len(count) == int(sol.num_steps) + 1


def test_safeguard_falls_back_to_picard():
    # Gradient steps of length 5 on the residual diverge (error factor -1.5 per
    # step on this map); every one is refused, and the Picard steps converge.
    fn = lambda y, a: 0.5 * y + 1.0
    wild = ij.OptaxSolver(optax.sgd(5.0))
    assert not bool(ij.fixed_point(fn, jnp.zeros(2), solver=wild).converged)
    sol = ij.fixed_point(fn, jnp.zeros(2), solver=ij.Safeguarded(wild), atol=1e-10)
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.value, 2.0, atol=1e-9)
    assert int(sol.stats["fallbacks"]) == int(sol.num_steps)
    # a good inner solver is never overruled
    tanh, args, y0 = PROBLEMS["tanh"]()
    out = ij.fixed_point(tanh, y0, args, solver=ij.Safeguarded(ij.Newton()))
    assert bool(out.converged) and int(out.stats["fallbacks"]) == 0


def test_switched_runs_first_then_second():
    fn, args, y0 = PROBLEMS["slow"]()
    kw = dict(atol=1e-10, max_steps=3000, trace=True)
    picard = ij.fixed_point(fn, y0, args, solver=ij.Picard(), **kw)
    switched = ij.Switched(ij.Picard(), ij.Newton(), after=7)
    sol = ij.fixed_point(fn, y0, args, solver=switched, **kw)
    assert int(sol.stats["switched_at"]) == 7
    np.testing.assert_allclose(sol.trace[:7], picard.trace[:7], rtol=1e-12)
    # Newton from there: quadratic convergence, a few steps where Picard needs
    # hundreds
    assert int(sol.num_steps) <= 7 + 6 and int(picard.num_steps) > 200
    np.testing.assert_allclose(sol.value, reference(fn, y0, args), atol=1e-9)
    # `below` switches on the residual instead, at the first step that reaches it
    early = ij.Switched(ij.Picard(), ij.Newton(), after=10**6, below=1e-2)
    out = ij.fixed_point(fn, y0, args, solver=early, **kw)
    two_norms = [
        float(jnp.linalg.norm(fn(y, args) - y))
        for y in [y0, *picard_iterates(fn, y0, args, int(out.stats["switched_at"]))]
    ]
    assert two_norms[-1] <= 1e-2 < min(two_norms[:-1])
    # never switched: -1
    never = ij.Switched(ij.Picard(), ij.Newton(), after=10**6)
    assert int(ij.fixed_point(fn, y0, args, solver=never).stats["switched_at"]) == -1


def test_backtracking_makes_newton_converge_from_far():
    # Newton on arctan(y) = 0 overshoots from |y0| > 1.39 and diverges; with the
    # Armijo line search it converges (and takes full steps near the root).
    # (per lane: the residual of arctan is bounded, so one two-norm over several
    # starts would let a diverging component hide behind the others)
    fn = lambda y, a: y - jnp.arctan(y)
    y0 = jnp.array([2.0, -3.0, 10.0])
    solve = lambda solver: jax.vmap(
        lambda y: ij.fixed_point(fn, y, solver=solver, atol=1e-12, max_steps=50)
    )(y0)
    assert not np.any(solve(ij.Newton()).converged)
    sol = solve(ij.Backtracking(ij.Newton()))
    assert np.all(sol.converged) and np.all(sol.stats["shrinks"] > 0)
    np.testing.assert_allclose(sol.value, 0.0, atol=1e-12)
    # a full step that decreases the residual is always taken: as plain Newton
    near = jnp.array([0.5])
    a = ij.fixed_point(fn, near, solver=ij.Newton(), atol=1e-12, trace=True)
    b = ij.fixed_point(
        fn, near, solver=ij.Backtracking(ij.Newton()), atol=1e-12, trace=True
    )
    assert int(b.stats["shrinks"]) == 0 and int(a.num_steps) == int(b.num_steps)
    np.testing.assert_allclose(a.trace, b.trace, rtol=1e-12)


def test_backtracking_on_a_loss_descends_and_shortens_into_its_domain():
    # L(y) = Σ (y² - 1/4)² - log(1 - y²)/10 is NaN for |y| >= 1, where its
    # gradient is finite and vanishes at ±1.03: full Newton steps from 0.15 leave
    # the domain and end there. The search on L shrinks NaN trials, so every
    # accepted step lowers L and the solve ends at the local minimum inside.
    loss = lambda y: jnp.sum((y**2 - 0.25) ** 2) - 0.1 * jnp.sum(jnp.log1p(-(y**2)))
    fn = lambda y, a: y - jax.grad(loss)(y)
    y0 = jnp.array([0.15])
    newton = ij.Newton(ij.CG(indefinite="truncate"), forcing="superlinear")
    searched = ij.Backtracking(newton, objective=loss)
    sol = ij.fixed_point(fn, y0, solver=searched, atol=1e-12)
    assert bool(sol.converged) and int(sol.stats["shrinks"]) > 0
    step = jax.jit(lambda y, state: searched.step(fn, y, None, state))
    y, state, losses = y0, searched.init(fn, y0, None), [loss(y0)]
    for _ in range(int(sol.num_steps)):
        y, state = step(y, state)
        losses.append(loss(y))
    assert np.all(np.diff(np.asarray(losses)) <= 0), losses
    np.testing.assert_allclose(y, sol.value, rtol=1e-12)
    eigs = np.linalg.eigvalsh(jax.hessian(loss)(sol.value))
    assert eigs.min() > 0 and np.all(np.abs(sol.value) < 1)
    outside = ij.fixed_point(fn, y0, solver=newton, atol=1e-12).value
    assert not bool(jnp.isfinite(loss(outside))), outside


def test_backtracking_on_a_loss_turns_to_the_gradient_off_descent():
    # Plain CG's Newton step is NaN on negative curvature (at y = 0.1 of the
    # double well): the search takes the residual -∇L instead, and counts it.
    loss = lambda y: jnp.sum((y**2 - 1) ** 2)
    fn = lambda y, a: y - jax.grad(loss)(y)
    y0 = jnp.full(3, 0.1)
    plain = ij.Newton(ij.CG(), forcing="superlinear")
    sol = ij.fixed_point(fn, y0, solver=ij.Backtracking(plain, objective=loss))
    assert bool(sol.converged) and int(sol.stats["turns"]) > 0
    np.testing.assert_allclose(sol.value, 1.0, atol=1e-6)
    assert "turns" not in ij.fixed_point(fn, y0, solver=ij.Backtracking(plain)).stats


@pytest.mark.parametrize(
    "objective, error, match",
    [
        ("loss", TypeError, "`objective` must be None or callable"),
        (lambda y: y, ValueError, "`objective` must return a scalar"),
    ],
)
def test_backtracking_names_a_bad_objective(objective, error, match):
    with pytest.raises(error, match=match):
        solver = ij.Backtracking(ij.Newton(), objective=objective)
        ij.fixed_point(lambda y, a: y / 2, jnp.ones(2), solver=solver)


def picard_iterates(fn, y, args, k):
    out = []
    for _ in range(k):
        y = fn(y, args)
        out.append(y)
    return out


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ij.Switched(ij.Picard(), ij.Newton(), after=-1), "after"),
        (lambda: ij.Backtracking(ij.Newton(), shrink=1.0), "shrink"),
        (lambda: ij.Backtracking(ij.Newton(), max_shrinks=0), "max_shrinks"),
        (lambda: ij.Backtracking(ij.Newton(), decrease=1.0), "decrease"),
        (lambda: ij.Switched(ij.Picard(), ij.Newton(), below=-1.0), "below"),
        (lambda: ij.Relaxed(ij.Picard(), -0.5), "relaxation"),
        (lambda: ij.Relaxed(ij.Picard(), 2.0), "relaxation"),
        (lambda: ij.RestartRule(sufficient_decay=1.5), "sufficient_decay"),
        (lambda: ij.RestartRule(artificial=0.0), "artificial"),
        (lambda: ij.RestartRule(0.9, 0.5), "must not exceed"),
        (lambda: ij.Safeguarded(ij.Anderson(), growth=0.5), "growth"),
        (lambda: ij.Halpern(reflection=1.5), "reflection"),
        (lambda: ij.Halpern(contraction=0.0), "contraction"),
    ],
)
def test_bad_hyperparameters_raise(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "wrapper, name",
    [
        (ij.Relaxed, "solver"),
        (ij.Restarted, "solver"),
        (ij.Safeguarded, "solver"),
        (ij.Backtracking, "solver"),
        (lambda s: ij.Switched(s, ij.Picard()), "first"),
        (lambda s: ij.Switched(ij.Picard(), s), "then"),
    ],
)
def test_wrapping_a_non_solver_raises(wrapper, name):
    with pytest.raises(TypeError, match=f"`{name}` must be an iterjax solver"):
        wrapper("anderson")


def test_wrappers_count_the_work_of_the_states_they_rebuild():
    # LazyNewton(1) computes one Jacobian per step, whatever its state; the
    # count must survive the restarts, line searches and fallbacks that rebuild
    # the inner state (`state_at`), and Switched adds both phases' counts.
    def excess(solver, fn, y0, **kw):
        sol = ij.fixed_point(fn, y0, solver=solver, atol=1e-12, **kw)
        assert bool(sol.converged)
        return int(sol.stats["jacobians"]) - int(sol.num_steps), sol.stats

    newton = ij.LazyNewton(1)
    cos = lambda y, a: jnp.cos(y)
    base, _ = excess(newton, cos, jnp.ones(3))
    extra, stats = excess(ij.Restarted(newton), cos, jnp.ones(3))
    assert int(stats["restarts"]) > 0 and extra == base
    far = lambda y, a: y - jnp.arctan(y)  # Newton overshoots from 2
    extra, stats = excess(ij.Backtracking(newton), far, jnp.array([2.0]))
    assert int(stats["shrinks"]) > 0 and extra == base
    extra, stats = excess(ij.Safeguarded(newton), far, jnp.array([2.0]), max_steps=200)
    assert int(stats["fallbacks"]) > 0 and extra == base
    switched = ij.Switched(newton, ij.Picard(), after=2)
    sol = ij.fixed_point(cos, jnp.ones(3), solver=switched, atol=1e-12)
    assert int(sol.stats["switched_at"]) == 2 and int(sol.num_steps) > 2
    assert int(sol.stats["jacobians"]) == 2 + base
