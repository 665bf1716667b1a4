"""Bilevel: argmin and hypergradient against the closed-form ridge hypergradient
(float64), convergence of every method as its budget grows, argmin gradients vs
finite differences, jit / vmap, bad input."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

import iterjax as ij
from iterjax import bilevel as bl

D, N, NV = 5, 40, 15
_k = jax.random.split(jax.random.PRNGKey(0), 5)
X = 0.8 * jax.random.normal(_k[0], (N, D))
XV = 0.8 * jax.random.normal(_k[1], (NV, D))
W_TRUE = jax.random.normal(_k[2], (D,))
Y = X @ W_TRUE + 0.3 * jax.random.normal(_k[3], (N,))
YV = XV @ W_TRUE + 0.3 * jax.random.normal(_k[4], (NV,))
THETA = jnp.log(jnp.linspace(0.2, 0.6, D))  # per-feature ridge penalties e^θ
W0 = jnp.zeros(D)


def inner(w, theta):
    return jnp.sum((X @ w - Y) ** 2) / (2 * N) + 0.5 * jnp.sum(jnp.exp(theta) * w**2)


def outer(w, theta):
    return jnp.sum((XV @ w - YV) ** 2) / (2 * NV)


def exact(theta):
    """∇F = -e^θ ⊙ w* ⊙ H⁻¹ ∇_w f(w*), H = XᵀX/N + diag(e^θ)."""
    H = X.T @ X / N + jnp.diag(jnp.exp(theta))
    w = jnp.linalg.solve(H, X.T @ Y / N)
    v = jnp.linalg.solve(H, XV.T @ (XV @ w - YV) / NV)
    return -jnp.exp(theta) * w * v


def rel_err(hg, theta=THETA):
    ref = exact(theta)
    return float(jnp.linalg.norm(hg.grad - ref) / jnp.linalg.norm(ref))


def hypergrad(method, theta=THETA, **kw):
    return ij.hypergradient(
        outer, inner, theta, W0, method=method, return_info=True, **kw
    )


SGD = optax.sgd(0.5)


def test_implicit_cg_matches_the_closed_form():
    hg = jax.jit(lambda t: hypergrad(bl.Implicit(), t))(THETA)
    assert rel_err(hg) < 1e-8
    assert bool(hg.converged) and int(hg.result) == 0
    # Newton-CG: a few gradients; the linear solve: at most D + 1 HVPs, plus Newton's.
    assert 1 <= int(hg.cost["inner_grads"]) <= 10 and int(hg.cost["hvps"]) > D
    np.testing.assert_allclose(hg.value, outer(hg.w, THETA), rtol=1e-12)
    # Without return_info the gradient itself; methods by name.
    g = ij.hypergradient(outer, inner, THETA, W0)
    np.testing.assert_allclose(g, exact(THETA), rtol=1e-8)
    g = ij.hypergradient(outer, inner, THETA, W0, method="forward")
    assert g.shape == THETA.shape and bool(jnp.all(jnp.isfinite(g)))


@pytest.mark.parametrize(
    "family, budgets",
    [
        (lambda k: bl.Implicit(ij.Neumann(k)), [2, 8, 32]),
        (lambda k: bl.Unrolled(SGD, k), [5, 20, 80]),
        (lambda k: bl.Truncated(SGD, 200, k), [1, 5, 20]),
        (lambda k: bl.Penalty(SGD, 400, lam=k), [100.0, 1000.0, 10000.0]),
    ],
    ids=["neumann", "unrolled", "truncated", "penalty"],
)
def test_every_method_converges_as_its_budget_grows(family, budgets):
    errors = [rel_err(hypergrad(family(k))) for k in budgets]
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[2] < 1e-3, errors


def test_rates_are_those_of_the_theory():
    # Penalty: error O(1/λ), so 10x λ is ~10x less error.
    e = [rel_err(hypergrad(bl.Penalty(SGD, 400, lam=lam))) for lam in (100.0, 1000.0)]
    assert 5 < e[0] / e[1] < 20, e
    # Unrolled / truncated: geometric in K and T at the GD contraction factor.
    H = X.T @ X / N + jnp.diag(jnp.exp(THETA))
    rate = float(jnp.max(jnp.abs(1 - 0.5 * jnp.linalg.eigvalsh(H))))
    e = [rel_err(hypergrad(bl.Truncated(SGD, 200, t))) for t in (4, 12)]
    assert e[1] / e[0] < 5 * rate**8, (e, rate)
    # Implicit with Richardson (fixed-point iteration on H v = b) and CG agree.
    hg = hypergrad(bl.Implicit(ij.Richardson(atol=1e-13)))
    assert rel_err(hg) < 1e-9 and bool(hg.converged)


def test_forward_mode_equals_reverse_mode_of_the_same_steps():
    fwd, rev = hypergrad(bl.Forward(SGD, 30)), hypergrad(bl.Unrolled(SGD, 30))
    np.testing.assert_allclose(fwd.grad, rev.grad, rtol=1e-10, atol=1e-14)
    assert int(fwd.cost["hvps"]) == 30 * D  # one JVP pass per coordinate of θ
    assert int(rev.cost["hvps"]) == 30


def test_argmin_matches_closed_form_and_finite_differences():
    solve = lambda t, **kw: ij.argmin(inner, W0, t, atol=1e-12, **kw).value
    H = X.T @ X / N + jnp.diag(jnp.exp(THETA))
    np.testing.assert_allclose(solve(THETA), jnp.linalg.solve(H, X.T @ Y / N))
    # An optax optimiser as the inner solver: the same minimiser.
    heavy_ball = optax.sgd(0.5, momentum=0.5)
    sol = ij.argmin(inner, W0, THETA, solver=heavy_ball, atol=1e-12, max_steps=2000)
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.value, solve(THETA), atol=1e-10)
    F = lambda t: outer(solve(t), t)
    check_grads(F, (THETA,), order=1, modes=["rev", "fwd"])
    np.testing.assert_allclose(jax.grad(F)(THETA), exact(THETA), rtol=1e-8)


def wells(w, t):
    """A tilted double well per coordinate: local minima near ±1, a maximum
    near 0, where the Hessian is negative definite."""
    return jnp.sum((w**2 - 1) ** 2) + jnp.dot(t, w)


def test_argmin_minimises_a_non_convex_loss_from_negative_curvature():
    # From w0 = 0.1 (negative curvature) plain Newton-CG breaks down (NaN, not
    # converged); the default line-search Newton-CG reaches the local minimum
    # near +1 in each coordinate, the root of 4w³ - 4w + t with 12w² - 4 > 0.
    t = jnp.array([0.1, -0.2, 0.3])
    w0 = jnp.full(3, 0.1)
    plain = ij.argmin(wells, w0, t, solver=ij.Newton(ij.CG(), forcing="superlinear"))
    assert not bool(plain.converged) and bool(jnp.all(jnp.isnan(plain.value)))
    sol = ij.argmin(wells, w0, t, atol=1e-12)
    roots = [np.roots([4.0, 0.0, -4.0, float(ti)]).real.max() for ti in t]
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.value, roots, rtol=1e-12)
    # differentiable at the local minimum: dw*/dt = -1/(12w² - 4), per coordinate
    solve = lambda t: ij.argmin(wells, w0, t, atol=1e-12).value
    np.testing.assert_allclose(
        jnp.diag(jax.jacobian(solve)(t)), -1 / (12 * sol.value**2 - 4), rtol=1e-8
    )
    check_grads(lambda t: jnp.sum(solve(t) ** 3), (t,), order=1, modes=["rev"])


def test_argmin_on_a_non_convex_loss_under_jit_and_vmap():
    # a batch of starts on both sides of the maxima: each lane its own step
    # count and local minimum, the same as one at a time
    starts = jnp.array([[0.1, -0.1, 0.5], [-0.3, 0.2, 2.0], [1.5, -1.5, 0.05]])
    t = jnp.array([0.1, -0.2, 0.3])
    run = jax.jit(jax.vmap(lambda w0: ij.argmin(wells, w0, t, atol=1e-12)))
    batch = run(starts)
    assert bool(jnp.all(batch.converged))
    assert bool(jnp.all(12 * batch.value**2 - 4 > 0))  # local minima
    assert len(np.unique(np.sign(batch.value), axis=0)) == 3  # three of them
    for i, w0 in enumerate(starts):
        one = ij.argmin(wells, w0, t, atol=1e-12)
        np.testing.assert_allclose(batch.value[i], one.value, rtol=1e-12)
        assert int(batch.num_steps[i]) == int(one.num_steps)


@pytest.mark.parametrize("forcing", ["superlinear", "eisenstat-walker"])
def test_newton_with_adaptive_forcing(forcing):
    # Logistic-type inner problem: Newton-CG with adaptive forcing reaches the
    # same minimiser as exact Newton, counting its CG products, in fewer steps
    # than systems solved to a fixed 0.1.
    def inner_lr(w, t):
        z = X @ w
        return jnp.mean(jnp.logaddexp(0.0, -jnp.sign(Y) * z)) + 0.5 * jnp.sum(
            jnp.exp(t) * w**2
        )

    newton = ij.Newton(ij.CG(), forcing=forcing)
    sol = ij.argmin(inner_lr, W0, THETA, solver=newton, atol=1e-12)
    ref = ij.argmin(inner_lr, W0, THETA, solver=ij.Newton(ij.GMRES()), atol=1e-12)
    fixed = ij.argmin(
        inner_lr, W0, THETA, solver=ij.Newton(ij.CG(rtol=0.1)), atol=1e-12
    )
    assert bool(sol.converged) and int(sol.stats["jvps"]) > 0
    assert int(sol.num_steps) < int(fixed.num_steps)
    np.testing.assert_allclose(sol.value, ref.value, atol=1e-11)
    with pytest.raises(ValueError, match="forcing"):
        ij.Newton(forcing="adaptive")


def test_jit_and_vmap_over_a_batch_of_theta():
    thetas = jnp.stack([THETA, THETA + 0.5, THETA - 0.5])
    f = jax.jit(jax.vmap(lambda t: hypergrad(bl.Implicit(), t).grad))
    np.testing.assert_allclose(f(thetas), jax.vmap(exact)(thetas), rtol=1e-7)
    g = jax.vmap(
        jax.grad(lambda t: outer(ij.argmin(inner, W0, t, atol=1e-12).value, t))
    )
    np.testing.assert_allclose(g(thetas), jax.vmap(exact)(thetas), rtol=1e-7)


def test_bad_input_is_rejected_or_reported():
    with pytest.raises(ValueError, match="scalar"):
        ij.argmin(lambda w, t: (w - t) ** 2, W0, THETA)
    with pytest.raises(ValueError, match="scalar"):
        ij.hypergradient(lambda w, t: w, inner, THETA, W0)
    with pytest.raises(
        TypeError, match=r"inner_loss\(w, theta\) failed with w float64\[6\]"
    ):
        ij.hypergradient(outer, inner, THETA, jnp.zeros(D + 1))  # w0 does not fit X
    with pytest.raises(TypeError, match="float"):
        ij.hypergradient(outer, inner, jnp.arange(D), W0)
    with pytest.raises(TypeError, match="method"):
        ij.hypergradient(outer, inner, THETA, W0, method=3)
    with pytest.raises(ValueError, match="unknown method"):
        ij.hypergradient(outer, inner, THETA, W0, method="implicitt")
    with pytest.raises(ValueError, match="truncate"):
        bl.Truncated(SGD, 10, 20)
    with pytest.raises(ValueError, match="lam"):
        bl.Penalty(SGD, 10, lam=0.0)
    with pytest.raises(TypeError, match="optax"):
        ij.OptaxSolver("adam")
    # A saddle: CG on the indefinite Hessian is reported, never a silent NaN.
    saddle = lambda w, t: 0.5 * (w[0] ** 2 - w[1] ** 2) + t @ w
    method = bl.Implicit(ij.CG(), solver=ij.Newton(ij.GMRES()))
    out = lambda w, t: jnp.sum(w**2)
    hg = ij.hypergradient(
        out, saddle, jnp.ones(2), jnp.zeros(2), method=method, return_info=True
    )
    assert not bool(hg.converged) and int(hg.result) != 0
    with pytest.raises(Exception, match="converge|finite"):
        jax.block_until_ready(
            ij.hypergradient(
                out, saddle, jnp.ones(2), jnp.zeros(2), method=method, throw=True
            )
        )


# --- stochastic bilevel solvers on a quadratic problem with a closed form ---

_q = jax.random.split(jax.random.PRNGKey(7), 3)
_U = jnp.linalg.qr(jax.random.normal(_q[0], (4, 4)))[0]
A = _U @ jnp.diag(jnp.array([1.0, 1.3, 1.6, 2.0])) @ _U.T
B = jax.random.normal(_q[1], (4, 3))
C = jax.random.normal(_q[2], (4,))
W_T, MU = jnp.array([1.0, -1.0, 0.5, 0.0]), 0.1


def q_inner(w, theta, noise):
    return 0.5 * w @ A @ w - w @ (B @ theta + C) + w @ noise


def q_outer(w, theta, noise):
    return 0.5 * jnp.sum((w - W_T) ** 2) + 0.5 * MU * theta @ theta + w @ noise


def q_optimum():
    M = jnp.linalg.solve(A, B)
    return jnp.linalg.solve(
        M.T @ M + MU * jnp.eye(3), M.T @ (W_T - jnp.linalg.solve(A, C))
    )


def _run(solver, steps, sigma=0.0, key=jax.random.PRNGKey(0)):
    def body(state, k):
        ka, kb = jax.random.split(k)
        nin = sigma * jax.random.normal(ka, (4,))
        nout = sigma * jax.random.normal(kb, (4,))
        return solver.step(state, nin, nout)

    state = solver.init(jnp.zeros(3), jnp.zeros(4))
    state, info = jax.lax.scan(body, state, jax.random.split(key, steps))
    return state, info


SOLVERS = {
    "soba": lambda: bl.SOBA(q_inner, q_outer, optax.sgd(0.05), inner_lr=0.3),
    "stocbio": lambda: bl.StocBiO(
        q_inner,
        q_outer,
        optax.sgd(0.2),
        inner_lr=0.4,
        inner_steps=5,
        neumann_terms=20,
    ),
    "amigo": lambda: bl.AmIGO(
        q_inner, q_outer, optax.sgd(0.2), inner_lr=0.4, inner_steps=5, v_steps=5
    ),
    "f2sa": lambda: bl.F2SA(
        q_inner,
        q_outer,
        optax.sgd(0.2),
        inner_lr=0.3,
        inner_steps=5,
        lam=10.0,
        lam_growth=10.0,
        lam_max=1e5,
    ),
}


@pytest.mark.parametrize("name", SOLVERS)
def test_stochastic_solvers_reach_the_bilevel_optimum(name):
    solver = SOLVERS[name]()
    state, info = jax.jit(lambda: _run(solver, 1500))()
    err = float(jnp.linalg.norm(state.theta - q_optimum()))
    assert err < 1e-3 * float(jnp.linalg.norm(q_optimum())) + 1e-5, err
    assert (int(info["grads"][0]), int(info["hvps"][0])) == solver.oracles
    assert solver.oracles[0] > 0
    # With noisy oracles the iterates still approach the optimum.
    noisy, _ = jax.jit(lambda: _run(solver, 1500, sigma=0.1))()
    assert float(jnp.linalg.norm(noisy.theta - q_optimum())) < 0.1 * float(
        jnp.linalg.norm(q_optimum())
    )


@pytest.mark.parametrize("name", SOLVERS)
def test_a_jitted_step_compiles_once_from_a_weakly_typed_start(name):
    # jnp.full(3, 0.0) is weakly typed; the state from init is not, so the
    # state a step returns has init's types and `jax.jit(step)` one compilation
    solver = SOLVERS[name]()
    state = solver.init(jnp.full(3, 0.0), jnp.full(4, 0.0))
    assert not any(a.weak_type for a in jax.tree.leaves(state))
    step = jax.jit(solver.step)
    for _ in range(3):
        state, _ = step(state, jnp.zeros(4), jnp.zeros(4))
    assert step._cache_size() == 1


def test_stocbio_with_a_fresh_batch_per_inner_call_is_its_paper_step():
    # Batches: K SGD steps on batches 0..K-1, the Neumann products on K..K+Q-2,
    # the cross product on K+Q-1 (Ji et al. 2021, Algorithm 1), written out
    solver = SOLVERS["stocbio"]()
    k, q, eta = solver.inner_steps, solver.neumann_terms, solver.inner_lr
    noise = 0.3 * jax.random.normal(jax.random.PRNGKey(5), (k + q, 4))
    out_noise = jnp.full(4, 0.1)
    theta, w = jnp.array([0.1, -0.2, 0.3]), jnp.array([0.5, 0.0, -0.5, 1.0])
    state = solver.init(theta, w)
    new, info = jax.jit(solver.step)(state, bl.Batches(noise), out_noise)
    grad_w = jax.grad(q_inner)
    for t in range(k):
        w = w - eta * grad_w(w, theta, noise[t])
    f_w, f_t = jax.grad(q_outer, (0, 1))(w, theta, out_noise)
    hvp = lambda v, e: jax.jvp(lambda u: grad_w(u, theta, e), (w,), (v,))[1]
    total = term = f_w
    for j in range(q - 1):
        term = term - eta * hvp(term, noise[k + j])
        total = total + term
    v = -eta * total
    cross = jax.grad(lambda t: jnp.vdot(grad_w(w, t, noise[-1]), v))(theta)
    np.testing.assert_allclose(new.w, w, rtol=1e-12)
    np.testing.assert_allclose(new.theta, theta - 0.2 * (f_t + cross), rtol=1e-12)
    assert (int(info["grads"]), int(info["hvps"])) == solver.oracles


@pytest.mark.parametrize("name", ["stocbio", "amigo"])
def test_fresh_inner_batches_reach_the_optimum_and_a_repeated_one_is_one(name):
    solver = SOLVERS[name]()
    # a stack of copies of one batch is that batch, bitwise
    state = solver.init(jnp.zeros(3), jnp.zeros(4))
    e = jnp.array([0.3, -0.1, 0.2, 0.0])
    same = bl.Batches(jnp.tile(e, (solver.inner_batches, 1)))
    a, _ = solver.step(state, same, e)
    b, _ = solver.step(state, e, e)
    np.testing.assert_array_equal(a.theta, b.theta)
    np.testing.assert_array_equal(a.w, b.w)

    # with noisy oracles, a fresh batch for every inner call, under jit and vmap
    def run(key, steps=1500, sigma=0.1):
        def body(state, k):
            ka, kb = jax.random.split(k)
            nin = sigma * jax.random.normal(ka, (solver.inner_batches, 4))
            nout = sigma * jax.random.normal(kb, (4,))
            return solver.step(state, bl.Batches(nin), nout)

        state = solver.init(jnp.zeros(3), jnp.zeros(4))
        return jax.lax.scan(body, state, jax.random.split(key, steps))[0]

    states = jax.jit(jax.vmap(run))(jax.random.split(jax.random.PRNGKey(2), 2))
    err = jnp.linalg.norm(states.theta - q_optimum()[None, :], axis=1)
    assert float(jnp.max(err)) < 0.1 * float(jnp.linalg.norm(q_optimum())), err


def test_a_stack_of_batches_is_refused_where_a_step_takes_one():
    soba, stocbio = SOLVERS["soba"](), SOLVERS["stocbio"]()
    stack = bl.Batches(jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="`Batches`"):
        soba.step(soba.init(jnp.zeros(3), jnp.zeros(4)), stack, jnp.zeros(4))
    with pytest.raises(ValueError, match="`Batches`"):
        state = stocbio.init(jnp.zeros(3), jnp.zeros(4))
        stocbio.step(state, jnp.zeros(4), stack)


def test_stochastic_solvers_vmap_and_reject_bad_input():
    solver = SOLVERS["soba"]()
    keys = jax.random.split(jax.random.PRNGKey(1), 3)
    states, _ = jax.jit(jax.vmap(lambda k: _run(solver, 300, 0.1, k)))(keys)
    assert states.theta.shape == (3, 3)
    assert not bool(jnp.allclose(states.theta[0], states.theta[1]))  # own noise
    with pytest.raises(TypeError, match="callable"):
        bl.SOBA(None, q_outer, optax.sgd(0.1))
    with pytest.raises(TypeError, match="optax"):
        bl.SOBA(q_inner, q_outer, "sgd")
    with pytest.raises(ValueError, match="inner_lr"):
        bl.StocBiO(q_inner, q_outer, optax.sgd(0.1), inner_lr=-1.0)
    with pytest.raises(ValueError, match="lam_max"):
        bl.F2SA(q_inner, q_outer, optax.sgd(0.1), lam=10.0, lam_max=1.0)


def test_saba_variance_reduction_converges_where_soba_stalls():
    # Finite sums whose means are the quadratic problem: per-sample noise e_i with
    # zero mean. SABA's per-sample tables cancel the noise at the solution.
    n = 16
    e_in = jax.random.normal(jax.random.PRNGKey(3), (n, 4))
    e_out = jax.random.normal(jax.random.PRNGKey(4), (n, 4))
    e_in = e_in - e_in.mean(0, keepdims=True)
    e_out = e_out - e_out.mean(0, keepdims=True)
    inner = lambda w, t, idx: q_inner(w, t, jnp.mean(e_in[idx], 0))
    outer = lambda w, t, idx: q_outer(w, t, jnp.mean(e_out[idx], 0))
    saba = bl.SABA(
        inner, outer, optax.sgd(0.05), num_inner=n, num_outer=n, inner_lr=0.2
    )
    soba = bl.SOBA(inner, outer, optax.sgd(0.05), inner_lr=0.2)

    def run(solver, steps=3000):
        def body(state, k):
            i, j = jax.random.randint(k, (2, 2), 0, n)
            return solver.step(state, i, j)

        state = solver.init(jnp.zeros(3), jnp.zeros(4))
        keys = jax.random.split(jax.random.PRNGKey(5), steps)
        return jax.lax.scan(body, state, keys)[0].theta

    err = lambda th: float(jnp.linalg.norm(th - q_optimum()))
    e_saba, e_soba = (
        err(jax.jit(lambda: run(saba))()),
        err(jax.jit(lambda: run(soba))()),
    )
    assert e_saba < 1e-6, e_saba
    assert e_soba > 100 * e_saba, (e_soba, e_saba)


def test_a_nan_loss_at_a_stationary_point_is_not_converged():
    # the gradient w - t vanishes at w = 1, where the loss is NaN
    loss = lambda w, t: 0.5 * (w - t) ** 2 + jnp.where(w > 0.5, jnp.nan, 0.0)
    sol = ij.argmin(loss, jnp.array(0.0), jnp.array(1.0))
    assert not bool(sol.converged) and int(sol.result) == 3
    assert "not finite" in sol.message
    with pytest.raises(ij.NonConvergenceError, match="not finite"):
        ij.argmin(loss, jnp.array(0.0), jnp.array(1.0), throw=True)
    hg = ij.hypergradient(
        lambda w, t: w**2, loss, jnp.array(1.0), jnp.array(0.0), return_info=True
    )
    assert not bool(hg.converged) and int(hg.result) == 3
    # a finite loss: converged as before
    ok = ij.argmin(lambda w, t: 0.5 * (w - t) ** 2, jnp.array(0.0), jnp.array(1.0))
    assert bool(ok.converged) and int(ok.result) == 0


@pytest.mark.parametrize("name", SOLVERS)
def test_an_empty_minibatch_is_refused(name):
    solver = SOLVERS[name]()
    state = solver.init(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match="`inner_batch` is empty"):
        solver.step(state, jnp.zeros((0,)), jnp.zeros(4))
    with pytest.raises(ValueError, match="`outer_batch` is empty"):
        solver.step(state, jnp.zeros(4), {"x": jnp.zeros((0, 4))})


def test_saba_index_batches_are_checked():
    n = 8
    e = jax.random.normal(jax.random.PRNGKey(3), (n, 4))
    inner = lambda w, t, idx: q_inner(w, t, jnp.mean(e[idx], 0))
    outer = lambda w, t, idx: q_outer(w, t, jnp.mean(e[idx], 0))
    saba = bl.SABA(
        inner, outer, optax.sgd(0.05), num_inner=n, num_outer=n, inner_lr=0.2
    )
    state = saba.init(jnp.zeros(3), jnp.zeros(4))
    ok = jnp.array([1, 2])
    with pytest.raises(TypeError, match="`inner_idx` must be integer"):
        saba.step(state, jnp.array([1.0, 2.0]), ok)
    with pytest.raises(ValueError, match="`outer_idx` must be a non-empty"):
        saba.step(state, ok, jnp.zeros((0,), jnp.int32))
    with pytest.raises(ValueError, match=r"outside \[0, 8\): \[8\]"):
        saba.step(state, jnp.array([1, 8]), ok)
    # under jit the indices are not known: out-of-range ones are skipped (the
    # tables and their means stay consistent) and counted
    step = jax.jit(saba.step)
    with_bad, info = step(state, jnp.array([2, 99]), jnp.array([1, -1]))
    only_good, info_good = step(state, jnp.array([2]), jnp.array([1]))
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15),
        with_bad,
        only_good,
    )
    assert int(info["skipped"]) == 2 and int(info_good["skipped"]) == 0
    tables = with_bad.aux[1]
    for table, mean in [
        (tables.inner, tables.inner_mean),
        (tables.outer, tables.outer_mean),
    ]:
        jax.tree.map(
            lambda t, m: np.testing.assert_allclose(jnp.mean(t, 0), m, atol=1e-12),
            table,
            mean,
        )


@pytest.mark.parametrize("name", SOLVERS)
def test_a_nan_sample_is_flagged_and_mismatched_batches_are_named(name):
    solver = SOLVERS[name]()
    state = solver.init(jnp.zeros(3), jnp.zeros(4))
    state, info = solver.step(state, jnp.zeros(4), jnp.zeros(4))
    assert bool(info["finite"])
    bad = jnp.zeros(4).at[1].set(jnp.nan)
    _, info = solver.step(state, bad, jnp.zeros(4))
    assert not bool(info["finite"])
    inner = lambda w, t, b: q_inner(w, t, b["x"][:4] + b["y"][:4])
    mixed = {"x": jnp.zeros(4), "y": jnp.zeros(5)}
    solver = solver.replace(inner_loss=inner)
    with pytest.raises(ValueError, match=r"leaves of `inner_batch` have different"):
        solver.step(state, mixed, jnp.zeros(4))


# --- Bloop: an auxiliary loss among the training loss's minimisers (optax).


def _pair(key, scale=1.0):
    k1, k2, k3 = jax.random.split(key, 3)
    tree = lambda k: {
        "w": jax.random.normal(k, (3, 2)),
        "b": (jax.random.normal(k, (2,)),),
    }
    return tree(k1), jax.tree.map(lambda a: scale * a, tree(k2)), tree(k3)


def test_bloop_direction_is_the_training_gradient_plus_an_orthogonal_part():
    g, a, params = _pair(jax.random.PRNGKey(0))
    opt = bl.bloop(aux_weight=0.7, decay=0.0)  # the deterministic projection
    d, state = opt.update((g, a), opt.init(params))
    extra = jax.tree.map(lambda u, v: u - v, d, g)
    vdot = lambda u, v: sum(
        jnp.vdot(x, y) for x, y in zip(*map(jax.tree.leaves, (u, v)))
    )
    assert abs(float(vdot(extra, g))) <= 1e-13 * float(vdot(a, a))  # ⟂ g, exactly
    # what is left of a is all of a's part orthogonal to g: a = extra/λ + c g
    c = vdot(a, g) / vdot(g, g)
    rebuilt = jax.tree.map(lambda e, u: e / 0.7 + c * u, extra, g)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-13), rebuilt, a)
    # with an EMA: orthogonal to the average m, not to this batch's gradient
    opt = bl.bloop(aux_weight=1.0, decay=0.9)
    state = opt.init(params)
    for i in range(5):
        g, a, _ = _pair(jax.random.PRNGKey(i + 1))
        d, state = opt.update((g, a), state)
    extra = jax.tree.map(lambda u, v: u - v, d, g)
    assert abs(float(vdot(extra, state.ema))) <= 1e-13 * float(vdot(a, a))
    assert abs(float(vdot(extra, g))) > 1e-3  # not orthogonal to the batch's own


def test_bloop_special_cases_and_optax_chain_under_jit_and_vmap():
    g, a, params = _pair(jax.random.PRNGKey(3))
    zero = jax.tree.map(jnp.zeros_like, g)
    for opt, updates, want in [
        (bl.bloop(0.0), (g, a), g),  # λ = 0: training alone
        (bl.bloop(0.5, 0.0), (g, g), g),  # an auxiliary gradient along g: nothing
        (bl.bloop(0.5, 0.0), (zero, a), jax.tree.map(lambda u: 0.5 * u, a)),  # m = 0
    ]:
        d, _ = opt.update(updates, opt.init(params))
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-14), d, want)
    chain = optax.chain(bl.bloop(0.3, 0.5), optax.sgd(0.1))
    state = chain.init(params)
    step = jax.jit(chain.update)
    upd, state = step((g, a), state, params)
    d, _ = bl.bloop(0.3, 0.5).update((g, a), bl.bloop(0.3, 0.5).init(params))
    jax.tree.map(
        lambda u, v: np.testing.assert_allclose(u, -0.1 * v, rtol=1e-14), upd, d
    )
    # vmap over a batch of (g, a) pairs: each as on its own
    gs, as_ = (jax.tree.map(lambda u: jnp.stack([u, 2 * u]), t) for t in (g, a))
    opt = bl.bloop(0.3, 0.0)
    ds = jax.vmap(lambda g, a: opt.update((g, a), opt.init(params))[0])(gs, as_)
    d1 = opt.update(
        (jax.tree.map(lambda u: 2 * u, g), jax.tree.map(lambda u: 2 * u, a)),
        opt.init(params),
    )[0]
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u[1], v, rtol=1e-13), ds, d1)


def test_bloop_finds_the_auxiliary_minimiser_among_the_training_minimisers():
    # L_main = (x1 + x2 - 1)^2 / 2: a line of minimisers; L_aux = |x - c|^2 / 2.
    # The simple bilevel solution is c's projection on the line, (0, 1) for
    # c = (1, 2); the weighted sum L_main + λ L_aux misses it by O(λ).
    c = jnp.array([1.0, 2.0])
    main = lambda x: 0.5 * (x[0] + x[1] - 1.0) ** 2
    aux = lambda x: 0.5 * jnp.sum((x - c) ** 2)
    x0 = jnp.array([3.0, -4.0])

    @functools.partial(jax.jit, static_argnums=1)
    def run(x, bloop):  # 3000 steps of the optax chain, in one scan
        opt = optax.chain(bl.bloop(aux_weight=0.5, decay=0.0), optax.sgd(0.2))
        if not bloop:  # the weighted sum L_main + 0.5 L_aux, for comparison
            opt = optax.sgd(0.2)

        def body(carry, _):
            x, state = carry
            gm, ga = jax.grad(main)(x), jax.grad(aux)(x)
            updates = (gm, ga) if bloop else gm + 0.5 * ga
            upd, state = opt.update(updates, state, x)
            return (optax.apply_updates(x, upd), state), None

        return jax.lax.scan(body, (x, opt.init(x)), None, length=3000)[0][0]

    np.testing.assert_allclose(run(x0, True), [0.0, 1.0], atol=1e-8)
    summed = run(x0, False)
    assert float(jnp.max(jnp.abs(summed - jnp.array([0.0, 1.0])))) > 0.05  # biased


def test_bloop_rejects_bad_hyperparameters_and_updates():
    with pytest.raises(ValueError, match="aux_weight"):
        bl.bloop(-1.0)
    with pytest.raises(ValueError, match="decay"):
        bl.bloop(0.1, decay=1.0)
    g, a, params = _pair(jax.random.PRNGKey(0))
    opt = bl.bloop(0.1)
    with pytest.raises(
        TypeError, match=r"`updates` must be the pair \(g_main, g_aux\)"
    ):
        opt.update(g, opt.init(params))
    with pytest.raises(ValueError, match="`g_aux` must have the parameters' structure"):
        opt.update((g, {"w": a["w"]}), opt.init(params))


# --- Several lower-level solutions (Kwon et al. 2023, "On penalty methods for
# nonconvex bilevel optimization"): g(w, θ) = ½(a·w - θ)² is minimised on the
# whole line S(θ) = {a·w = θ}, and F(θ) = min over S(θ) of f(w) = ½|w - c|²
# (the optimistic selection y*(θ), c projected onto the line), so that
# ∇F(θ) = (θ - a·c) / |a|². The penalty's hypergradient is exactly
# λ(θ - a·c) / (1 + λ|a|²), O(1/λ) from it.

LINE_A, LINE_C = jnp.array([1.0, 2.0]), jnp.array([1.0, -1.0])


def _line_losses():
    inner = lambda w, t: 0.5 * (LINE_A @ w - t) ** 2
    outer = lambda w, t: 0.5 * jnp.sum((w - LINE_C) ** 2)
    return outer, inner


def test_penalty_is_order_one_over_lambda_close_on_a_line_of_minimisers():
    outer, inner = _line_losses()
    theta, a2, ac = 2.0, float(LINE_A @ LINE_A), float(LINE_A @ LINE_C)
    exact = (theta - ac) / a2
    errors = []
    for lam in (1.0, 10.0, 100.0):
        # GD contracts at 1 - lr / λ along the line: steps enough for 1e-13
        method = bl.Penalty(optax.sgd(0.3), int(120 * lam) + 200, lam=lam)
        for w0 in (jnp.zeros(2), jnp.array([5.0, -3.0])):  # any start: y_λ is unique
            g = bl.hypergradient(outer, inner, theta, w0, method=method)
            closed = lam * (theta - ac) / (1 + lam * a2)
            np.testing.assert_allclose(g, closed, rtol=1e-9)
        errors.append(abs(float(g) - exact))
    # O(1/λ): each 10x of λ cuts the error by about 10x
    for big, small in zip(errors, errors[1:]):
        assert 8.0 < big / small < 11.0


def test_implicit_formula_at_the_optimistic_selection_on_a_line_of_minimisers():
    # With several solutions, ∇F = ∇_θ f - ∂²_θw g H† ∇_w f at y* = the
    # minimiser of f on S(θ): there ∇_w f is in range(H), and CG from 0 on the
    # consistent singular system gives the minimum-norm H†∇_w f
    outer, inner = _line_losses()
    theta, a2, ac = 2.0, float(LINE_A @ LINE_A), float(LINE_C @ LINE_A)
    y_star = LINE_C + (theta - ac) / a2 * LINE_A
    method = bl.Implicit(ij.CG(rtol=1e-12))
    g = bl.hypergradient(outer, inner, theta, y_star, method=method)
    np.testing.assert_allclose(g, (theta - ac) / a2, rtol=1e-10)
    # at another minimiser of g, ∇_w f leaves range(H): the system has no
    # solution, CG meets p·Ap = 0 and the answer is NaN, not converged, never a
    # plausible number (the penalty method finds the selection by itself)
    other = y_star + 3.0 * jnp.array([2.0, -1.0])  # a ⟂ (2, -1): still on S
    info = bl.hypergradient(outer, inner, theta, other, method=method, return_info=True)
    assert np.isnan(float(info.grad)) and not bool(info.converged)


# --- Beyond strong convexity: BO-REP (unbounded smoothness), V-PBGD (a lower
# level with several minimisers).
#
# Unbounded smoothness: w*(θ) = Mθ - noise, F(θ) = ½|Mθ - c|² + ¼Σθ⁴, whose
# Hessian MᵀM + 3 diag(θ²) grows with the gradient: (L₀, L₁)-smooth, not
# L-smooth. Its minimiser by Newton's method, to machine precision.

M_U = jnp.array([[1.0, 0.5], [-0.3, 1.0], [0.2, 0.1]])
C_U = jnp.array([1.0, -2.0, 0.5])


def u_inner(w, theta, noise):
    return 0.5 * jnp.sum((w - M_U @ theta) ** 2) + w @ noise


def u_outer(w, theta, noise):
    return 0.5 * jnp.sum((w - C_U) ** 2) + 0.25 * jnp.sum(theta**4) + w @ noise


def u_optimum():
    grad_F = jax.grad(lambda t: u_outer(M_U @ t, t, jnp.zeros(3)))
    hessian_F = jax.hessian(lambda t: u_outer(M_U @ t, t, jnp.zeros(3)))
    newton = jax.jit(lambda t: t - jnp.linalg.solve(hessian_F(t), grad_F(t)))
    theta = jnp.zeros(2)
    for _ in range(50):
        theta = newton(theta)
    assert float(jnp.linalg.norm(grad_F(theta))) < 1e-13
    return theta


def _u_run(solver, steps, theta0, sigma=0.0, key=jax.random.PRNGKey(0)):
    def body(state, k):
        ka, kb = jax.random.split(k)
        noise = lambda k: sigma * jax.random.normal(k, (3,))
        return solver.step(state, noise(ka), noise(kb))

    state = solver.init(theta0, jnp.zeros(3))
    return jax.lax.scan(body, state, jax.random.split(key, steps))


def test_borep_converges_under_unbounded_smoothness_where_sgd_diverges():
    theta0, star = jnp.array([20.0, -20.0]), u_optimum()
    lr = optax.exponential_decay(0.5, 100, 0.7, end_value=1e-5)
    borep = bl.BOREP(
        u_inner,
        u_outer,
        bl.normalized_momentum(lr, beta=0.5),
        inner_lr=0.5,
        init_steps=50,
        inner_steps=5,
        period=3,
    )
    state, info = jax.jit(lambda: _u_run(borep, 3000, theta0))()
    assert float(jnp.linalg.norm(state.theta - star)) < 1e-4
    # noisy oracles: still close
    noisy, _ = jax.jit(lambda: _u_run(borep, 3000, theta0, sigma=0.1))()
    assert float(jnp.linalg.norm(noisy.theta - star)) < 0.05
    # the lower level: refined once (50 steps), then 5 steps every third step
    grads = np.asarray(info["grads"])
    assert grads[0] == 51 and list(grads[1:7]) == [1, 1, 6, 1, 1, 6]
    assert np.all(np.asarray(info["hvps"]) == 2)
    assert borep.oracles == (1 + 5 / 3, 2)
    # SOBA with SGD steps of the same start size: the θ⁴ term blows it up
    soba = bl.SOBA(u_inner, u_outer, optax.sgd(0.5), inner_lr=0.5)
    state, info = jax.jit(lambda: _u_run(soba, 50, theta0))()
    assert not bool(info["finite"][-1])


def test_vpbgd_is_order_one_over_gamma_close_on_a_line_of_minimisers():
    # g = ½(a·w - θ)²: S(θ) is a line; f = ½|w - c|² + ½θ². F(θ) = (θ - a·c)²/(2|a|²)
    # + θ²/2 at the optimistic selection; the penalty's stationary θ solves
    # γ(θ - a·c)/(1 + γ|a|²) + θ = 0, O(1/γ) from θ* = a·c / (1 + |a|²).
    a2, ac = float(LINE_A @ LINE_A), float(LINE_A @ LINE_C)
    inner = lambda w, t, b: 0.5 * (LINE_A @ w - t[0]) ** 2
    outer = lambda w, t, b: 0.5 * jnp.sum((w - LINE_C) ** 2) + 0.5 * jnp.sum(t**2)
    exact = ac / (1 + a2)
    errors = []
    for gamma in (1.0, 10.0, 100.0):
        # single loop (one step of z, y and θ a step) and double loop
        for inner_steps, y_steps in ((1, 1), (5, 20)):
            solver = bl.VPBGD(
                inner,
                outer,
                optax.sgd(0.2),
                inner_lr=0.2,
                gamma=gamma,
                inner_steps=inner_steps,
                y_steps=y_steps,
            )
            run = lambda s: jax.lax.scan(
                lambda st, _: s.step(st, None, None),
                s.init(jnp.array([3.0]), jnp.zeros(2)),
                None,
                length=int(400 * gamma / y_steps) + 400,
            )
            state, info = jax.jit(run)(solver)
            closed = gamma * ac / (gamma * (1 + a2) + 1)
            np.testing.assert_allclose(state.theta[0], closed, rtol=1e-8)
            assert int(info["hvps"][0]) == 0  # first order only
            assert int(info["grads"][0]) == inner_steps + 2 * y_steps + 3
        errors.append(abs(float(state.theta[0]) - exact))
    for big, small in zip(errors, errors[1:]):  # O(1/γ)
        assert 8.0 < big / small < 11.0


def test_vpbgd_projects_onto_the_lower_level_constraint_set():
    # g = ½(w₀ - θ)² on Y = {w₁ ≥ 1}; f = ½|w|²: at the selection w = (θ, 1), so
    # F = (θ² + 1)/2 + θ²/2 is minimal at θ = 0 with w₁ pinned at the bound
    inner = lambda w, t, b: 0.5 * (w[0] - t[0]) ** 2
    outer = lambda w, t, b: 0.5 * jnp.sum(w**2) + 0.5 * jnp.sum(t**2)
    project = lambda w: w.at[1].set(jnp.maximum(w[1], 1.0))
    solver = bl.VPBGD(
        inner,
        outer,
        optax.sgd(0.2),
        inner_lr=0.5,
        gamma=50.0,
        y_steps=5,
        project=project,
    )
    state = solver.init(jnp.array([2.0]), jnp.array([3.0, 5.0]))
    state, _ = jax.jit(
        lambda s: jax.lax.scan(
            lambda st, _: solver.step(st, None, None), s, None, length=800
        )
    )(state)
    assert abs(float(state.theta[0])) < 1e-6
    np.testing.assert_allclose(state.aux, jnp.array([0.0, 1.0]), atol=1e-5)
    with pytest.raises(TypeError, match="`project`"):
        bl.VPBGD(inner, outer, optax.sgd(0.1), project="clip")


def _check_transforms(make, lrs, theta0, w0, outer, batch=None, steps=5):
    """Through `steps` solver steps from (theta0, w0): check_grads of the outer
    loss in θ₀ (reverse mode), and a jit + vmap over the step sizes `lrs` (a
    pytree leaf of the solver) equal to one run per step size."""

    def loss(theta0, solver):
        state = solver.init(theta0, w0)
        state, _ = jax.lax.scan(
            lambda s, _: solver.step(s, batch, batch), state, None, length=steps
        )
        return outer(state.w, state.theta, batch)

    check_grads(lambda t: loss(t, make(float(lrs[-1]))), (theta0,), 1, modes=["rev"])
    batched = jax.jit(jax.vmap(lambda r: loss(theta0, make(r))))(lrs)
    singles = [loss(theta0, make(float(r))) for r in lrs]
    np.testing.assert_allclose(batched, jnp.stack(singles), rtol=1e-12)


@pytest.mark.parametrize("name", ["borep", "vpbgd"])
def test_borep_and_vpbgd_under_jit_vmap_and_grad(name):
    if name == "borep":
        make = lambda lr: bl.BOREP(
            q_inner, q_outer, optax.sgd(0.1), inner_lr=lr, init_steps=5, period=2
        )
    else:
        make = lambda lr: bl.VPBGD(q_inner, q_outer, optax.sgd(0.1), inner_lr=lr)

    theta0, zeros = jnp.array([0.3, -0.2, 0.5]), jnp.zeros(4)
    _check_transforms(make, jnp.array([0.1, 0.3]), theta0, zeros, q_outer, zeros, 6)
    with pytest.raises(ValueError, match="inner_lr"):
        make(-1.0)
    if name == "borep":
        with pytest.raises(ValueError, match="`period`"):
            bl.BOREP(q_inner, q_outer, optax.sgd(0.1), period=0)
        with pytest.raises(ValueError, match="`beta`"):
            bl.normalized_momentum(0.1, beta=1.0)
    else:
        with pytest.raises(ValueError, match="`gamma`"):
            bl.VPBGD(q_inner, q_outer, optax.sgd(0.1), gamma=0.0)


# LV-HBA on a lower level with bounds: w*(θ) = argmin {½|w - θ|² : w ≥ b} =
# max(θ, b); F = ½|w - c|² + ½ρ|θ|², so per component φ(θ) = ½(max(θ, b) - c)²
# + ½ρθ², convex on each side of b: its minimiser is the better of the two sides'.
C_CON, B_CON, RHO_CON = (
    jnp.array([2.0, -1.0, 0.5, -0.3]),
    jnp.array([0.0, 0.0, 1.0, -1.0]),
    0.1,
)


def _constrained():
    f = lambda w, t, b: 0.5 * jnp.sum((w - t) ** 2)
    F = lambda w, t, b: 0.5 * jnp.sum((w - C_CON) ** 2) + 0.5 * RHO_CON * t @ t
    con = lambda w, t, b: B_CON - w
    project = lambda w, t: (jnp.maximum(w, B_CON), t)
    phi = lambda t: 0.5 * (jnp.maximum(t, B_CON) - C_CON) ** 2 + 0.5 * RHO_CON * t**2
    above = jnp.maximum(B_CON, C_CON / (1 + RHO_CON))
    below = jnp.minimum(B_CON, 0.0)
    star = jnp.where(phi(above) <= phi(below), above, below)
    return f, F, con, project, star


def test_lvhba_solves_a_bilevel_problem_with_a_constrained_lower_level():
    f, F, con, project, star = _constrained()
    w_star = jnp.maximum(star, B_CON)
    assert bool(jnp.any(w_star == B_CON)) and bool(jnp.any(w_star > B_CON))
    solver = bl.LVHBA(f, F, optax.sgd(0.05), constraint=con, project=project)
    state = solver.init(jnp.zeros(4), jnp.zeros(4))

    def body(state, _):
        state, info = solver.step(state, None, None)
        return state, (jnp.linalg.norm(state.theta - star), info["hvps"])

    state, (errors, hvps) = jax.jit(
        lambda s: jax.lax.scan(body, s, None, length=20000)
    )(state)
    # the upper objective enters as F / c_k: the error falls as c_k grows
    assert float(errors[-1]) < 0.25 * float(errors[1999]) and float(errors[-1]) < 0.1
    assert float(jnp.linalg.norm(state.w - w_star)) < 0.01
    assert bool(jnp.all(state.w >= B_CON))  # projected onto the feasible set
    assert int(jnp.max(hvps)) == 0  # Hessian-free
    lam = state.aux.lam
    assert bool(jnp.all((lam >= 0) & (lam <= solver.multiplier_bound)))


def test_lvhba_under_jit_vmap_and_grad_and_rejects_bad_input():
    f, F, con, project, _ = _constrained()
    make = lambda lr: bl.LVHBA(
        f, F, optax.sgd(0.05), constraint=con, project=project, inner_lr=lr
    )

    theta0, w0 = jnp.array([0.3, -0.2, 0.5, 0.1]), jnp.array([3.0, 2.0, 4.0, 1.0])
    _check_transforms(make, jnp.array([0.02, 0.05]), theta0, w0, F)  # interior
    with pytest.raises(TypeError, match="`constraint`"):
        bl.LVHBA(f, F, optax.sgd(0.1), constraint=None, project=project)
    with pytest.raises(TypeError, match="`project`"):
        bl.LVHBA(f, F, optax.sgd(0.1), constraint=con, project=None)
    with pytest.raises(ValueError, match="`growth`"):
        bl.LVHBA(f, F, optax.sgd(0.1), constraint=con, project=project, growth=0.5)
    with pytest.raises(ValueError, match="`gamma1`"):
        bl.LVHBA(f, F, optax.sgd(0.1), constraint=con, project=project, gamma1=0.0)


# sl-BAMM on its paper's merely convex toy (a pytree w = {a, b}): g = ½|a|² - θ·a
# ignores b, so g's minimisers are {a = θ, any b}; f = ½|θ - b|² + ½|a - e|²
# selects b = θ (optimistic), and θ* = e, w* = (e, e). SOBA's w-step never moves
# b, so it settles at the wrong θ = e/2 (with b = 0: F(θ) = ½|θ|² + ½|θ - e|²).
E_MC = jnp.array([1.0, 2.0, -1.0])


def _merely_convex():
    g = lambda w, t, b: 0.5 * w["a"] @ w["a"] - t @ w["a"]
    f = lambda w, t, b: (
        0.5 * jnp.sum((t - w["b"]) ** 2) + 0.5 * jnp.sum((w["a"] - E_MC) ** 2)
    )
    return g, f, {"a": jnp.zeros(3), "b": jnp.zeros(3)}


def test_slbamm_finds_the_optimistic_solution_where_soba_does_not():
    g, f, w0 = _merely_convex()
    run = lambda solver: jax.lax.scan(
        lambda s, _: solver.step(s, None, None),
        solver.init(jnp.zeros(3), w0),
        None,
        length=4000,
    )
    state, info = jax.jit(run)(bl.SLBAMM(g, f, optax.sgd(0.2), inner_lr=0.5))
    np.testing.assert_allclose(state.theta, E_MC, atol=1e-3)
    np.testing.assert_allclose(state.w["b"], E_MC, atol=1e-3)
    np.testing.assert_allclose(state.w["a"], E_MC, atol=1e-3)
    assert (int(info["grads"][0]), int(info["hvps"][0])) == (3, 2)
    soba, _ = jax.jit(run)(bl.SOBA(g, f, optax.sgd(0.2), inner_lr=0.5))
    np.testing.assert_allclose(soba.theta, E_MC / 2, atol=1e-3)


def test_slbamm_under_jit_vmap_and_grad_and_rejects_bad_input():
    g, f, w0 = _merely_convex()
    make = lambda lr: bl.SLBAMM(g, f, optax.sgd(0.2), inner_lr=lr)

    _check_transforms(make, jnp.array([0.2, 0.5]), jnp.array([0.3, -0.2, 0.5]), w0, f)
    with pytest.raises(ValueError, match="`mu`"):
        bl.SLBAMM(g, f, optax.sgd(0.1), mu=1.0)
    with pytest.raises(ValueError, match="`mu_decay`"):
        bl.SLBAMM(g, f, optax.sgd(0.1), mu_decay=0.0)


# Multi-block: m ridge tasks sharing per-feature log-penalties θ. Task i's inner
# loss on its samples idx, g_i = mean ½(X_i w - y_i)² + ½ Σ e^θ w², outer the
# validation loss f_i plus a ridge on θ; F(θ) = mean_i f_i(w_i*(θ)) in closed form.
MB_M, MB_N, MB_D = 8, 12, 3
_mb = jax.random.split(jax.random.PRNGKey(7), 4)
MB_X = jax.random.normal(_mb[0], (MB_M, MB_N, MB_D))
MB_Y = MB_X @ jnp.array([1.0, -0.5, 0.2]) + 0.5 * jax.random.normal(
    _mb[1], (MB_M, MB_N)
)
MB_XV = jax.random.normal(_mb[2], (MB_M, MB_N, MB_D))
MB_YV = MB_XV @ jnp.array([1.0, -0.5, 0.2]) + 0.5 * jax.random.normal(
    _mb[3], (MB_M, MB_N)
)


def mb_inner(w, theta, batch):
    i, idx = batch
    r = MB_X[i, idx] @ w - MB_Y[i, idx]
    return 0.5 * jnp.mean(r**2) + 0.5 * jnp.sum(jnp.exp(theta) * w**2)


def mb_outer(w, theta, batch):
    i, idx = batch
    fit = 0.5 * jnp.mean((MB_XV[i, idx] @ w - MB_YV[i, idx]) ** 2)
    return fit + 0.05 * jnp.sum(theta**2)  # keeps θ* finite


def mb_F(theta):
    def task(X, y, Xv, yv):
        w = jnp.linalg.solve(X.T @ X / MB_N + jnp.diag(jnp.exp(theta)), X.T @ y / MB_N)
        return 0.5 * jnp.mean((Xv @ w - yv) ** 2)

    return jnp.mean(jax.vmap(task)(MB_X, MB_Y, MB_XV, MB_YV)) + 0.05 * theta @ theta


def _mb_run(solver, steps, blocks, batch, key):
    def body(state, k):
        kb, ki, ko = jax.random.split(k, 3)
        ids = jax.random.choice(kb, MB_M, (blocks,), replace=False)
        pick = lambda k: jax.random.randint(k, (blocks, batch), 0, MB_N)
        full = jnp.broadcast_to(jnp.arange(MB_N), (blocks, MB_N))
        inner, outer = (full, full) if batch == MB_N else (pick(ki), pick(ko))
        return solver.step(state, (ids, inner), outer)[0], None

    state = solver.init(jnp.zeros(MB_D), jnp.zeros(MB_D))
    return jax.lax.scan(body, state, jax.random.split(key, steps))[0]


def test_multiblock_with_every_block_and_full_batches_is_the_deterministic_step():
    full = jnp.broadcast_to(jnp.arange(MB_N), (MB_M, MB_N))
    ids = jnp.arange(MB_M)

    def deterministic(theta, W, V):  # multi-block SOBA, written out
        def block(i, w, v):
            f_w, f_t = jax.grad(mb_outer, (0, 1))(w, theta, (i, full[i]))
            g_w = lambda w: jax.grad(mb_inner)(w, theta, (i, full[i]))
            hv = jax.jvp(g_w, (w,), (v,))[1]
            cross = jax.vjp(lambda t: jax.grad(mb_inner)(w, t, (i, full[i])), theta)
            d = f_t + cross[1](v)[0]
            return w - 0.3 * g_w(w), v - 0.3 * (hv + f_w), d

        W, V, d = jax.vmap(block)(ids, W, V)
        return theta - 0.5 * jnp.mean(d, 0), W, V

    for vr in (True, False):
        solver = bl.MultiBlock(
            mb_inner,
            mb_outer,
            optax.sgd(0.5),
            inner_lr=0.3,
            num_blocks=MB_M,
            blocks_per_step=MB_M,
            variance_reduction=vr,
        )
        state = solver.init(jnp.zeros(MB_D), jnp.zeros(MB_D))
        theta, W, V = jnp.zeros(MB_D), jnp.zeros((MB_M, MB_D)), jnp.zeros((MB_M, MB_D))
        step = jax.jit(solver.step)
        for _ in range(5):
            state, info = step(state, (ids, full), full)
            theta, W, V = deterministic(theta, W, V)
        np.testing.assert_allclose(state.theta, theta, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(state.w, W, rtol=1e-12, atol=1e-14)
    assert (int(info["grads"]), int(info["hvps"])) == (2 * MB_M, 2 * MB_M)


def test_multiblock_variance_reduction_converges_and_a_step_does_not_grow_with_m():
    newton = jax.jit(  # on the closed form F (jitted: not eager dispatch)
        lambda t: t - jnp.linalg.solve(jax.hessian(mb_F)(t), jax.grad(mb_F)(t))
    )
    theta_star = jnp.zeros(MB_D)
    for _ in range(30):
        theta_star = newton(theta_star)
    assert float(jnp.linalg.norm(jax.grad(mb_F)(theta_star))) < 1e-12
    errors = {}
    for vr in (True, False):
        solver = bl.MultiBlock(
            mb_inner,
            mb_outer,
            optax.sgd(0.5),
            inner_lr=0.3,
            num_blocks=MB_M,
            blocks_per_step=2,
            variance_reduction=vr,
        )
        state = jax.jit(lambda: _mb_run(solver, 800, 2, MB_N, jax.random.PRNGKey(0)))()
        errors[vr] = float(jnp.linalg.norm(state.theta - theta_star))
    # 2 of 8 blocks a step, constant steps: the SAGA tables converge, the plain
    # block mean stalls at its sampling noise
    assert errors[True] < 1e-6 < errors[False], errors

    def flops(m):
        solver = bl.MultiBlock(
            mb_inner, mb_outer, optax.sgd(0.5), num_blocks=m, blocks_per_step=2
        )
        state = solver.init(jnp.zeros(MB_D), jnp.zeros(MB_D))
        idx = jnp.zeros((2, 4), jnp.int32)
        args = (state, (jnp.array([0, 1]), idx), idx)
        return jax.jit(solver.step).lower(*args).cost_analysis()["flops"]

    assert flops(1024) < 1.2 * flops(8)  # O(I), not O(m): tables are updated in place
    with pytest.raises(ValueError, match="`blocks_per_step`"):
        bl.MultiBlock(
            mb_inner, mb_outer, optax.sgd(0.1), num_blocks=2, blocks_per_step=3
        )
    solver = bl.MultiBlock(
        mb_inner, mb_outer, optax.sgd(0.1), num_blocks=4, blocks_per_step=2
    )
    state = solver.init(jnp.zeros(MB_D), jnp.zeros(MB_D))
    # a block whose loss is NaN is flagged at the step that samples it
    nan_outer = lambda w, t, b: mb_outer(w, t, b) * jnp.where(b[0] == 3, jnp.nan, 1.0)
    idx = jnp.zeros((2, 4), jnp.int32)
    flagged = solver.replace(outer_loss=nan_outer)
    assert bool(flagged.step(state, (jnp.array([0, 1]), idx), idx)[1]["finite"])
    assert not bool(flagged.step(state, (jnp.array([3, 1]), idx), idx)[1]["finite"])
    with pytest.raises(ValueError, match="`blocks` must hold"):
        solver.step(
            state,
            (jnp.arange(3), jnp.zeros((3, 4), jnp.int32)),
            jnp.zeros((3, 4), jnp.int32),
        )


# --- Self-Tuning Networks: a layer gated by the hyperparameters (flax NNX).


def test_stn_layer_is_a_dense_layer_until_its_gate_learns():
    from flax import nnx

    from iterjax.bilevel.stn import STNLinear

    layer = STNLinear(4, 3, 2, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    x = jax.random.normal(jax.random.key(1), (5, 4))
    W = layer.elem[...] + layer.hyper[...]
    for h in (jnp.zeros(2), jnp.array([3.0, -1.0]), jnp.ones((5, 2))):
        np.testing.assert_allclose(layer(x, h), x @ W + layer.bias[...][None, :])
    layer.gate[...] = jnp.array([[1.0, 0.0, 2.0], [0.0, 1.0, 0.0]])
    h = jnp.array([0.5, -1.0])
    scale = 1.0 + h @ layer.gate[...]
    expected = x @ layer.elem[...] + (x @ layer.hyper[...]) * scale[None, :]
    np.testing.assert_allclose(layer(x, h), expected, rtol=1e-12)
    with pytest.raises(ValueError, match="`h` must have 2 features"):
        layer(x, jnp.zeros(3))


def test_stn_best_response_gives_the_ridge_hypergradient():
    # ridge with log-penalty λ: w*(λ) = (XᵀX/n + e^λ I)⁻¹ Xᵀy/n. A one-output STN
    # fitted to the training loss at λ̂ - σ, λ̂, λ̂ + σ is affine in λ, so it learns
    # w*(λ̂) and dw*/dλ: the validation loss's derivative through it is the
    # hypergradient (closed form by implicit differentiation)
    from flax import nnx

    from iterjax.bilevel.stn import STNLinear
    from iterjax.internal import optax_init, optax_step

    n, lam_hat, sigma = N, 1.0, 0.1
    # centred features: the best response's bias is then mean(y) at every λ, as
    # the STN's ungated bias can represent
    Xc, XVc = X - jnp.mean(X, 0)[None, :], XV - jnp.mean(X, 0)[None, :]
    layer = STNLinear(D, 1, 1, rngs=nnx.Rngs(0), param_dtype=jnp.float64)
    graph, params = nnx.split(layer)

    def weights(params, lam):  # W(λ) for h = λ - λ̂, and the bias
        m = nnx.merge(graph, params)
        scale = (lam - lam_hat) * m.gate[...][0] + m.gate_bias[...]
        return m.elem[...][:, 0] + m.hyper[...][:, 0] * scale[0], m.bias[...][0]

    def train_loss(params, lam):
        w, b = weights(params, lam)
        fit = 0.5 * jnp.mean((Xc @ w + b - Y) ** 2)
        return fit + 0.5 * jnp.exp(lam) * w @ w

    opt = optax.adam(1e-2)

    lams = lam_hat + sigma * jnp.array([-1.0, 0.0, 1.0])  # λ's spread around λ̂

    def step(carry, key):
        params, state = carry
        loss = lambda p: jnp.mean(jax.vmap(lambda lam: train_loss(p, lam))(lams))
        return optax_step(opt, jax.grad(loss)(params), state, params), None

    keys = jax.random.split(jax.random.key(2), 20000)  # the slope is learnt slowly
    params, _ = jax.jit(lambda p: jax.lax.scan(step, (p, optax_init(opt, p)), keys)[0])(
        params
    )

    val = lambda w, b: 0.5 * jnp.mean((XVc @ w + b - YV) ** 2)
    stn_grad = jax.grad(lambda lam: val(*weights(params, lam)))(lam_hat)

    def exact_w(lam):  # with the bias fitted too (the STN has one)
        A = jnp.concatenate([Xc, jnp.ones((n, 1))], 1)
        reg = jnp.diag(jnp.concatenate([jnp.full(D, jnp.exp(lam)), jnp.zeros(1)]))
        wb = jnp.linalg.solve(A.T @ A / n + reg, A.T @ Y / n)
        return wb[:-1], wb[-1]

    exact = jax.grad(lambda lam: val(*exact_w(lam)))(lam_hat)
    np.testing.assert_allclose(stn_grad, exact, rtol=0.05)
    # and at λ̂ itself the STN is the best response (to O(σ²): a line through
    # a curve's three points)
    w_hat, w_star = weights(params, lam_hat)[0], exact_w(lam_hat)[0]
    assert float(jnp.linalg.norm(w_hat - w_star)) < 0.03 * float(
        jnp.linalg.norm(w_star)
    )


def test_lvhba_takes_a_single_scalar_constraint():
    # one constraint, returned as a scalar: a 0-d multiplier (the sum of the
    # coordinates bounded below). w*(θ) is θ moved onto {Σw >= 1} along the
    # all-ones direction; F pulls w to (2, -1), whose sum is already 1.
    f = lambda w, t, b: 0.5 * jnp.sum((w - t) ** 2)
    F = lambda w, t, b: 0.5 * jnp.sum((w - jnp.array([2.0, -1.0])) ** 2)
    con = lambda w, t, b: 1.0 - jnp.sum(w)

    def project(w, t):
        gap = jnp.maximum(1.0 - jnp.sum(w), 0.0)
        return w + gap / w.shape[0], t

    solver = bl.LVHBA(f, F, optax.sgd(0.05), constraint=con, project=project)
    state = solver.init(jnp.zeros(2), jnp.zeros(2))
    assert state.aux.lam.shape == ()
    state = jax.jit(
        lambda s: jax.lax.fori_loop(0, 5000, lambda _, s: solver.step(s)[0], s)
    )(state)
    np.testing.assert_allclose(state.w, [2.0, -1.0], atol=0.05)
    assert float(jnp.sum(state.w)) >= 1.0 - 1e-6
