"""iterjax.scan against jax.lax.scan: forward, jit, vmap, grad and bad inputs."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import iterjax as ij
from iterjax.experiments.common import cells
from iterjax.sequence.elk import gauss_jordan
from iterjax.sequence.elk import solve as elk_solve

METHODS = [
    ij.Jacobi(),
    ij.GaussSeidel(block=4),
    ij.sequence.Picard(),
    ij.DEER(),
    ij.DEER(damping=0.3),
    ij.QuasiDEER(),
    ij.ELK(damping=0.5),
    ij.QuasiELK(damping=0.5),
    ij.DEER(jacobian_every=3),
    ij.QuasiDEER(jacobian_every=2),
    ij.ELK(damping=0.5, jacobian_every=2),
]
IDS = [
    "jacobi",
    "gauss-seidel",
    "picard",
    "deer",
    "deer-damped",
    "quasi",
    "elk",
    "quasi-elk",
    "lazy-deer",
    "lazy-quasi",
    "lazy-elk",
]

CELLS = {
    "contractive": lambda: cells.tanh_rnn(dim=5, length=64, scale=0.8),
    "expanding": lambda: cells.tanh_rnn(dim=5, length=40, scale=1.6, seed=3),
    "gru": lambda: cells.gru(dim=6, length=64, input_dim=3),
}


@functools.cache
def _lax_scan(cell):
    """`lax.scan` on a cell, once a module (the reference of every method)."""
    f, init, xs = CELLS[cell]()
    return jax.lax.scan(f, init, xs)


def _close(a, b, tol):
    jax.tree_util.tree_map(
        lambda u, v: np.testing.assert_allclose(u, v, atol=tol, rtol=tol), a, b
    )


# ----------------------------------------------------------------- forward


@pytest.mark.parametrize("cell", list(CELLS))
@pytest.mark.parametrize("method", METHODS, ids=IDS)
def test_matches_lax_scan_under_jit(method, cell):
    # under jit: one compiled program per case (most other tests call scan
    # eagerly, which compiles its loop alone)
    f, init, xs = CELLS[cell]()
    kw = dict(method=method, atol=1e-12, return_stats=True)
    carry, ys, stats = jax.jit(lambda i, x: ij.scan(f, i, x, **kw))(init, xs)
    _close((carry, ys), _lax_scan(cell), 1e-8)
    assert bool(stats.converged) and int(stats.result) == 0
    assert 2 <= int(stats.num_sweeps) <= xs.shape[0]
    assert float(stats.residual) <= 1e-12


def test_newton_needs_few_sweeps_jacobi_needs_more():
    f, init, xs = cells.gru(dim=8, length=512)
    run = lambda m: ij.scan(f, init, xs, method=m, atol=1e-10, return_stats=True)
    sweeps = {
        name: int(run(m)[2].num_sweeps)
        for name, m in [("deer", ij.DEER()), ("jacobi", ij.Jacobi())]
    }
    assert sweeps["deer"] <= 8, sweeps
    assert sweeps["deer"] < sweeps["jacobi"] < 512, sweeps


@pytest.mark.parametrize("method", [ij.Jacobi(), ij.GaussSeidel(block=3)])
def test_exact_after_length_sweeps_even_without_tolerance(method):
    """Causality + frozen prefix: T sweeps reproduce lax.scan on any cell."""
    f, init, xs = cells.tanh_rnn(dim=4, length=24, scale=2.5, seed=1)
    carry, ys = ij.scan(f, init, xs, method=method, atol=0.0, max_sweeps=24)
    _close((carry, ys), jax.lax.scan(f, init, xs), 1e-12)


@pytest.mark.parametrize("every", [2, 3, 4])
def test_lazy_jacobians_same_solution_fewer_jacobians(every):
    f, init, xs = cells.gru(dim=6, length=256, input_dim=3)
    run = lambda m: ij.scan(f, init, xs, method=m, atol=1e-10, return_stats=True)
    c1, y1, s1 = run(ij.DEER())
    cd, yd, sd = run(ij.DEER(jacobian_every=every))
    _close((cd, yd), (c1, y1), 1e-9)
    assert bool(sd.converged)
    # every sweep linearises but the last, which tests the last update (f alone)
    assert int(s1.jacobians) == int(s1.num_sweeps) - 1
    # sweeps 0, d, 2d, ... linearise; the rest evaluate f alone
    assert int(sd.jacobians) <= -(-int(sd.num_sweeps) // every)
    assert int(sd.jacobians) < int(s1.jacobians)
    assert int(sd.num_sweeps) <= 2 * int(s1.num_sweeps)
    # Jacobi has no A_t to reuse: nothing changes
    assert int(run(ij.Jacobi(jacobian_every=every))[2].jacobians) == 0


def test_gauss_seidel_block_t_is_one_update_and_one_check():
    f, init, xs = cells.gru(dim=4, length=30)
    out = ij.scan(f, init, xs, method=ij.GaussSeidel(block=30), return_stats=True)
    assert int(out[2].num_sweeps) == 2
    _close(out[:2], jax.lax.scan(f, init, xs), 1e-12)


WINDOWED = [
    ij.sequence.Picard(8),
    ij.DEER(window=16),
    ij.GaussSeidel(block=3, window=9),
]


@pytest.mark.parametrize("cell", ["contractive", "expanding"])
@pytest.mark.parametrize("method", WINDOWED, ids=["picard", "deer", "gs"])
def test_sliding_window_matches_lax_scan(method, cell):
    f, init, xs = CELLS[cell]()
    carry, ys, stats = ij.scan(
        f, init, xs, method=method, atol=1e-12, return_stats=True
    )
    _close((carry, ys), jax.lax.scan(f, init, xs), 1e-8)
    assert bool(stats.converged) and float(stats.residual) <= 1e-12
    # every sweep accepts at least one position of the window
    assert int(stats.num_sweeps) <= xs.shape[0]


def test_sliding_window_jacobi_is_exact_after_length_sweeps():
    f, init, xs = cells.tanh_rnn(dim=4, length=24, scale=2.5, seed=1)
    out = ij.scan(f, init, xs, method=ij.Jacobi(window=5), atol=0.0, max_sweeps=24)
    _close(out, jax.lax.scan(f, init, xs), 1e-12)


def test_evaluations_count_positions_not_yet_accepted():
    # atol 0 on an expanding cell: each sweep accepts exactly the next position,
    # so sweep k evaluates T - k + 1 unaccepted ones (of T, or of a window W)
    f, init, xs = cells.tanh_rnn(dim=3, length=12, scale=2.5, seed=1)
    *_, stats = ij.scan(f, init, xs, method=ij.Jacobi(), atol=0.0, return_stats=True)
    assert int(stats.num_sweeps) == 12 and int(stats.evaluations) == 12 * 13 // 2
    method = ij.Jacobi(window=5)
    *_, stats = ij.scan(f, init, xs, method=method, atol=0.0, return_stats=True)
    assert int(stats.evaluations) == 8 * 5 + (4 + 3 + 2 + 1)  # then the last 4
    *_, stats = ij.scan(f, init, xs, method=ij.Sequential(), return_stats=True)
    assert int(stats.evaluations) == 12


def test_picard_window_trades_sweeps_for_evaluations():
    """ParaDiGMS: a window of W steps evaluates W increments per sweep; on an Euler
    ODE solve with small steps it needs about T / W * (sweeps per window)."""
    euler = lambda h, dt: (h + dt * jnp.cos(h) + dt * jnp.sin(3 * h), h)
    xs = jnp.full(256, 2.0 / 256)
    ref = jax.lax.scan(euler, jnp.ones(2), xs)
    sweeps = {}
    for w in (None, 64, 16):
        *out, stats = ij.scan(
            euler,
            jnp.ones(2),
            xs,
            atol=1e-12,
            return_stats=True,
            method=ij.sequence.Picard(w),
        )
        _close(tuple(out), ref, 1e-10)
        sweeps[w] = int(stats.num_sweeps)
    assert sweeps[None] < sweeps[64] < sweeps[16] < 256, sweeps
    assert 16 * sweeps[16] < 256 * sweeps[None], sweeps  # fewer evaluations


# scan ravels the carry once for every method: one method per family suffices
FAMILIES = [ij.Jacobi(), ij.GaussSeidel(block=4), ij.DEER(), ij.QuasiELK(damping=0.5)]


@pytest.mark.parametrize("method", FAMILIES, ids=["jacobi", "gs", "deer", "qelk"])
def test_pytree_carry_inputs_and_outputs(method):
    k1, k2 = jax.random.split(jax.random.PRNGKey(4))
    xs = {"a": jax.random.normal(k1, (50, 3)), "b": (jax.random.normal(k2, (50,)),)}
    init = {"h": jnp.zeros(3), "c": (jnp.ones((2, 1)),)}

    def f(carry, x):
        h = jnp.tanh(0.5 * carry["h"] + x["a"] + carry["c"][0].sum())
        c = 0.7 * jnp.cos(carry["c"][0]) + x["b"][0]
        return {"h": h, "c": (c,)}, (h.sum(), {"c": c})

    out = ij.scan(f, init, xs, method=method, atol=1e-12)
    _close(out, jax.lax.scan(f, init, xs), 1e-8)


def test_mixed_precision_carry_keeps_dtypes():
    init = {"a": jnp.zeros(2, jnp.float32), "b": jnp.zeros(3)}
    f = lambda c, x: (
        {"a": jnp.tanh(c["a"] + x[:2].astype(jnp.float32)), "b": 0.5 * c["b"] + x},
        None,
    )
    xs = jnp.ones((20, 3))
    carry, _ = ij.scan(f, init, xs, atol=1e-10)
    assert carry["a"].dtype == jnp.float32 and carry["b"].dtype == jnp.float64
    _close(carry, jax.lax.scan(f, init, xs)[0], 1e-6)


@pytest.mark.parametrize("method", [ij.DEER(), ij.Jacobi()], ids=["deer", "jacobi"])
def test_reverse_and_length_without_xs(method):
    f, init, xs = cells.tanh_rnn(dim=4, length=30)
    out = ij.scan(f, init, xs, reverse=True, method=method, atol=1e-12)
    _close(out, jax.lax.scan(f, init, xs, reverse=True), 1e-9)
    g = lambda h, _: (jnp.cos(h) * 0.9, h[0])
    out = ij.scan(g, jnp.ones(2), None, length=25, method=method, atol=1e-12)
    _close(out, jax.lax.scan(g, jnp.ones(2), None, length=25), 1e-9)


def test_sequential_is_lax_scan_and_takes_integer_carries():
    f = lambda c, x: (c + x, c * 2)
    xs = jnp.arange(10)
    out = ij.scan(f, jnp.int32(0), xs.astype(jnp.int32), method=ij.Sequential())
    _close(out, jax.lax.scan(f, jnp.int32(0), xs.astype(jnp.int32)), 0)


def test_float32():
    f, init, xs = cells.gru(dim=8, length=128)
    to32 = lambda t: jax.tree_util.tree_map(lambda a: a.astype(jnp.float32), t)
    init32, xs32 = to32(init), to32(xs)
    f32 = lambda h, x: jax.tree_util.tree_map(
        lambda a: a.astype(jnp.float32), f(h.astype(jnp.float64), x.astype(jnp.float64))
    )
    run = jax.jit(lambda i, x: ij.scan(f32, i, x, atol=1e-5, return_stats=True))
    carry, ys, stats = run(init32, xs32)
    assert carry.dtype == jnp.float32 and bool(stats.converged)
    _close(carry, jax.lax.scan(f, init, xs)[0], 1e-4)


# ----------------------------------------------------------- robustness


def _dense_lm_step(blocks, r, lam):
    """(M^T M + λ I)^{-1} M^T r over free positions 0..n-1 of r [n, D], with
    M = I - subdiag(blocks[1:]): blocks[s] [D, D] links position s to s - 1
    (blocks[0], the link to a frozen predecessor, is unused)."""
    n, D = r.shape
    M = np.eye(n * D)
    for s in range(1, n):
        M[s * D : (s + 1) * D, (s - 1) * D : s * D] = -blocks[s]
    rhs = M.T @ np.ravel(r)
    return np.linalg.solve(M.T @ M + lam * np.eye(n * D), rhs).reshape(n, D)


def test_elk_step_solves_the_levenberg_marquardt_system():
    """One ELK sweep equals the dense solve of (M^T M + λ I) δ = M^T r."""
    f, init, xs = cells.tanh_rnn(dim=2, length=6, scale=1.5)
    cell = lambda h, x: f(h, x)[0]
    X = jax.random.normal(jax.random.PRNGKey(0), (6, 2))
    prev = jnp.concatenate([init[None], X[:-1]])
    r = jax.vmap(cell)(prev, xs) - X
    frozen = jnp.array([True, False, False, False, False, False])
    r = jnp.where(frozen[:, None], 0, r)
    method = ij.ELK(damping=0.3)
    _, jac = method.linearize(cell, prev, xs)
    delta = jax.jit(method.sweep, static_argnums=0)(cell, init, X, xs, r, jac, frozen)
    lam = 0.3 * jnp.max(jnp.sum(r**2, axis=-1))
    # Dense M = I - subdiag(J_t) over the free positions 2..6.
    np.testing.assert_allclose(jac, jax.vmap(jax.jacfwd(cell))(prev, xs), atol=1e-13)
    expected = _dense_lm_step(jac[1:], r[1:], lam)
    np.testing.assert_allclose(delta[0], 0, atol=0)
    np.testing.assert_allclose(delta[1:], expected, atol=1e-10)


@pytest.mark.parametrize("quasi", [False, True], ids=["elk", "quasi-elk"])
def test_elk_paper_step_is_the_kalman_filter_mean_with_fixed_lambda(quasi):
    """sigmasq fixes λ = 1/σ²; smooth=False steps with the filtered means: δ_t is
    the last block of the Levenberg-Marquardt solve over positions up to t."""
    T, D = 6, 2
    f, init, xs = cells.tanh_rnn(dim=D, length=T, scale=1.5)
    cell = lambda h, x: f(h, x)[0]
    X = jax.random.normal(jax.random.PRNGKey(0), (T, D))
    prev = jnp.concatenate([init[None], X[:-1]])
    frozen = jnp.arange(T) < 1
    cls = ij.QuasiELK if quasi else ij.ELK
    method = cls(sigmasq=4.0, smooth=False)
    fx, jac = method.linearize(cell, prev, xs)
    r = jnp.where(frozen[:, None], 0, fx - X)
    delta = jax.jit(method.sweep, static_argnums=0)(cell, init, X, xs, r, jac, frozen)
    blocks = jax.vmap(jnp.diag)(jac) if quasi else jac
    np.testing.assert_allclose(delta[0], 0, atol=0)
    for t in range(2, T + 1):  # positions 1..t-1 are free
        full = _dense_lm_step(blocks[1:t], r[1:t], 0.25)
        np.testing.assert_allclose(delta[t - 1], full[-1], rtol=1e-10, atol=1e-12)


def test_gauss_jordan_solves_batches_with_pivoting():
    """ELK's CPU solve: random batches, and a permutation (zero diagonal: no step
    succeeds without pivoting)."""
    M = jax.random.normal(jax.random.PRNGKey(0), (4, 3, 6, 6))
    X = jax.random.normal(jax.random.PRNGKey(1), (4, 3, 6, 2))
    got = jax.jit(gauss_jordan)(M, X)
    np.testing.assert_allclose(got, np.linalg.solve(M, X), rtol=1e-10, atol=1e-10)
    P = jnp.eye(6)[jnp.array([3, 0, 5, 1, 2, 4])]
    np.testing.assert_allclose(jax.jit(elk_solve)(P, X[0, 0]), P.T @ X[0, 0], atol=0)


@pytest.mark.parametrize("batch", [1, 3, None])
def test_quasi_deer_diagonal_is_exact_for_any_jvp_batch(batch):
    f, init, xs = cells.gru(dim=7, length=9, input_dim=3)
    cell = lambda h, x: f(h, x)[0]
    prev = jax.random.normal(jax.random.PRNGKey(2), (9, 7))
    fx, a = ij.QuasiDEER(jvp_batch=batch).linearize(cell, prev, xs)
    jac = jax.vmap(jax.jacfwd(cell))(prev, xs)
    np.testing.assert_allclose(a, jnp.diagonal(jac, axis1=1, axis2=2), atol=1e-13)
    np.testing.assert_allclose(fx, jax.vmap(cell)(prev, xs), atol=1e-13)


def test_quasi_elk_step_is_the_exact_levenberg_marquardt_step():
    """One QuasiELK sweep (Kalman smoother) equals the dense solve of
    (M^T M + λ I) δ = M^T r with M = I - subdiag(diag J_t), over free positions."""
    T, D = 7, 3
    f, init, xs = cells.tanh_rnn(dim=D, length=T, scale=2.0)
    cell = lambda h, x: f(h, x)[0]
    X = jax.random.normal(jax.random.PRNGKey(1), (T, D))
    prev = jnp.concatenate([init[None], X[:-1]])
    frozen = jnp.arange(T) < 2
    method = ij.QuasiELK(damping=0.3)
    fx, a = method.linearize(cell, prev, xs)
    r = jnp.where(frozen[:, None], 0, fx - X)
    delta = jax.jit(method.sweep, static_argnums=0)(cell, init, X, xs, r, a, frozen)
    jac = jax.vmap(jax.jacfwd(cell))(prev, xs)
    np.testing.assert_allclose(a, jnp.diagonal(jac, axis1=1, axis2=2), atol=1e-12)
    lam = 0.3 * jnp.max(jnp.sum(r**2, axis=-1))
    expected = _dense_lm_step(jax.vmap(jnp.diag)(a[2:]), r[2:], lam)
    np.testing.assert_allclose(delta[:2], 0, atol=0)
    np.testing.assert_allclose(delta[2:], expected, rtol=1e-10, atol=1e-12)


def test_diverging_newton_falls_back_and_stays_finite():
    """Undamped DEER on a strongly expanding cell: no NaN, still exact by T sweeps."""
    f, init, xs = cells.tanh_rnn(dim=6, length=48, scale=6.0, seed=2)
    carry, ys, stats = ij.scan(
        f, init, xs, method=ij.DEER(), atol=1e-10, return_stats=True
    )
    assert bool(jnp.all(jnp.isfinite(ys))) and bool(stats.converged)
    assert float(stats.residual) <= 1e-10


def test_non_convergence_is_reported_and_thrown():
    f, init, xs = cells.tanh_rnn(dim=4, length=200, scale=0.95)
    _, ys, stats = ij.scan(
        f, init, xs, method=ij.Jacobi(), max_sweeps=3, return_stats=True
    )
    assert not bool(stats.converged) and int(stats.result) == 1
    assert int(stats.num_sweeps) == 3 and bool(jnp.all(jnp.isfinite(ys)))
    with pytest.raises(ij.NonConvergenceError, match="scan"):
        ij.scan(f, init, xs, method=ij.Jacobi(), max_sweeps=3, throw=True)


def test_nan_in_cell_is_reported_not_hidden():
    f = lambda h, x: (jnp.where(x > 5, jnp.nan, 0.5 * h + x), h)
    xs = jnp.arange(10.0)
    _, _, stats = ij.scan(f, jnp.zeros(()), xs, method=ij.DEER(), return_stats=True)
    assert int(stats.result) == 2 and not bool(stats.converged)


@pytest.mark.parametrize(
    "method",
    [ij.DEER(), ij.Jacobi(), ij.ELK(damping=0.5), ij.QuasiDEER()],
    ids=["deer", "jacobi", "elk", "quasi"],
)
def test_non_finite_values_stay_where_lax_scan_has_them(method):
    # a NaN in xs: lax.scan is NaN from there on; so is iterjax.scan, exact before
    f, init, xs = cells.tanh_rnn(dim=4, length=100, scale=0.8)
    xs = xs.at[50, 1].set(jnp.nan)
    c0, y0 = jax.lax.scan(f, init, xs)
    c, y, stats = ij.scan(f, init, xs, method=method, atol=1e-10, return_stats=True)
    assert int(stats.result) == 2 and not bool(stats.converged)
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(y0))
    assert not bool(jnp.any(jnp.isfinite(c)))
    np.testing.assert_allclose(y[:50], y0[:50], atol=1e-9)
    with pytest.raises(ij.NonConvergenceError):
        ij.scan(f, init, xs, method=method, atol=1e-10, throw=True)
    # an overflowing recurrence (float32): non-finite from the same step on
    g = lambda h, x: (2 * h + 1, h)
    h0 = jnp.zeros((), jnp.float32)
    _, y0 = jax.lax.scan(g, h0, None, length=200)
    c, y, stats = ij.scan(g, h0, None, length=200, method=method, return_stats=True)
    assert int(stats.result) == 2 and not bool(jnp.isfinite(c))
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(y0))


def test_trace_records_residual_per_sweep():
    f, init, xs = cells.gru(dim=4, length=100)
    *_, stats = ij.scan(f, init, xs, atol=1e-10, return_stats=True, trace=True)
    k = int(stats.num_sweeps)
    assert stats.trace.shape == (100,)  # T sweeps at most
    assert bool(jnp.all(jnp.isfinite(stats.trace[:k])))
    assert bool(jnp.all(jnp.isnan(stats.trace[k:])))
    # the trace holds the stopping test's quantity: max(residual, update), and
    # above the tolerance wherever a position is not accepted yet
    assert float(stats.trace[k - 1]) <= 1e-10
    assert max(float(stats.residual), float(stats.update)) <= 1e-10
    assert float(stats.trace[k - 2]) > 1e-10


def _rotating_rnn(radius, length, dim=2, seed=1):
    """h_t = tanh(radius R h_{t-1} + x_t), R a rotation: bounded states, but a
    perturbation grows where tanh is not saturated (radius > 1)."""
    c, s = np.cos(0.5), np.sin(0.5)
    R = radius * jnp.array([[c, -s], [s, c]])
    xs = 0.05 * jax.random.normal(jax.random.PRNGKey(seed), (length, dim))
    return (lambda h, x: (jnp.tanh(R @ h + x), h)), jnp.zeros(dim), xs


@pytest.mark.parametrize("method", METHODS + [ij.DEER(window=64)], ids=IDS + ["win"])
def test_converged_means_close_to_lax_scan_where_errors_amplify(method):
    # a residual test alone let damped DEER report converged 250x atol away here;
    # every accepted position's update is now within atol too
    f, init, xs = _rotating_rnn(1.6, 400)
    _, ys_ref = jax.lax.scan(f, init, xs)
    bumped = jax.lax.scan(f, init, xs.at[0].add(1e-9))[1]
    assert float(jnp.max(jnp.abs(bumped - ys_ref))) > 30e-9  # it does amplify
    _, ys, stats = ij.scan(f, init, xs, method=method, atol=1e-8, return_stats=True)
    assert bool(stats.converged)
    assert float(jnp.max(jnp.abs(ys - ys_ref))) <= 100 * 1e-8
    assert max(float(stats.residual), float(stats.update)) <= 1e-8


def _amplifying():
    """(f, init, xs) of a rotation that grows errors 1.03^t (1e5 over T = 400)."""
    c, s = np.cos(0.3), np.sin(0.3)
    R = 1.03 * jnp.array([[c, -s], [s, c]])
    f = lambda h, x: (R @ h - 0.02 * jnp.sin(h) ** 3 + x, h)
    xs = 0.01 * jax.random.normal(jax.random.PRNGKey(0), (400, 2))
    return f, jnp.array([0.01, 0.0]), xs


def test_deer_error_is_atol_however_much_the_recurrence_amplifies():
    # errors grow 1.03^t (1e5 over the sequence); DEER's update is the error to
    # first order, so a converged solve is within atol of lax.scan, where the
    # residual test alone stopped 1e5 atol away
    f, init, xs = _amplifying()
    _, ys_ref = jax.lax.scan(f, init, xs)
    for method in (ij.DEER(), ij.DEER(window=64), ij.ELK(damping=0.5)):
        _, ys, stats = ij.scan(f, init, xs, method=method, atol=1e-8, return_stats=True)
        assert bool(stats.converged)
        assert float(jnp.max(jnp.abs(ys - ys_ref))) <= 1e-8


def test_returned_carries_include_the_last_update():
    # the papers' loops return X^{k+1}: Newton's last step makes float32 DEER as
    # accurate as lax.scan's own rounding, with the default atol
    f, init, xs = cells.gru(dim=2, length=2000, input_dim=2)
    f32 = lambda h, x: (lambda c: (c[0].astype(jnp.float32),) * 2)(
        f(h.astype(jnp.float64), x.astype(jnp.float64))
    )
    init32, xs32 = init.astype(jnp.float32), xs.astype(jnp.float32)
    ref = jax.lax.scan(f32, init32, xs32)[1]
    _, ys, stats = ij.scan(f32, init32, xs32, return_stats=True)
    assert bool(stats.converged) and float(stats.update) <= 1e-6
    assert float(jnp.max(jnp.abs(ys - ref))) <= 2e-7  # was 4.6e-7 without
    # float64: the update of the last sweep is (quadratically) far below atol
    _, ys, stats = ij.scan(f, init, xs, atol=1e-8, return_stats=True)
    assert float(jnp.max(jnp.abs(ys - jax.lax.scan(f, init, xs)[1]))) <= 1e-12


# ----------------------------------------------------------------- jit / vmap


@pytest.mark.parametrize(
    "method", [ij.Jacobi(), ij.DEER(), ij.GaussSeidel(4)], ids=["jacobi", "deer", "gs"]
)
def test_vmap_per_element_sweeps(method):
    _, init, xs = cells.tanh_rnn(dim=4, length=80)
    _, _, batch_xs = cells.tanh_rnn(dim=4, length=80, seed=7)
    scales = jnp.array([0.1, 0.6, 0.95])  # contraction rates differ: so do sweeps
    k = jax.random.normal(jax.random.PRNGKey(0), (4, 4))
    w = k / jnp.linalg.norm(k, 2)

    def run(scale):
        f = lambda h, x: (jnp.tanh(scale * (w @ h) + x), h[0])
        return ij.scan(f, init, batch_xs, method=method, atol=1e-11, return_stats=True)

    carry, ys, stats = jax.vmap(run)(scales)
    singles = [run(s) for s in scales]
    sweeps = [int(s[2].num_sweeps) for s in singles]
    np.testing.assert_array_equal(stats.num_sweeps, sweeps)
    assert len(set(sweeps)) > 1, sweeps
    for i, s in enumerate(singles):
        _close((carry[i], ys[i]), s[:2], 1e-13)


# ----------------------------------------------------------------- grad


def _gru_loss(method, scan):
    def loss(params, init, xs):
        f = lambda h, x: (cells.gru_cell(params, h, x), jnp.sum(h**2))
        if scan is jax.lax.scan:
            carry, ys = scan(f, init, xs)
        else:
            carry, ys = scan(f, init, xs, method=method, atol=1e-12)
        return jnp.sum(ys * jnp.linspace(0, 1, ys.shape[0])) + jnp.sum(jnp.sin(carry))

    return loss


# With a window too: the adjoint recurrence is linear, its diagonal A_t are
# computed once and slide with the window; dense ones are recomputed per window.
WINDOWED_GRAD = [ij.QuasiDEER(window=16), ij.QuasiELK(window=16), ij.DEER(window=16)]


@pytest.mark.parametrize(
    "method",
    METHODS + WINDOWED_GRAD,
    ids=IDS + ["quasi-window", "quasi-elk-window", "deer-window"],
)
def test_grad_matches_lax_scan(method):
    params = cells.gru_params(jax.random.PRNGKey(1), 5, 3)
    init = 0.1 * jnp.ones(5)
    xs = jax.random.normal(jax.random.PRNGKey(2), (48, 3))
    mine = jax.jit(jax.grad(_gru_loss(method, ij.scan), argnums=(0, 1, 2)))(
        params, init, xs
    )
    _close(mine, _lax_scan_grad(), 1e-7)


@functools.cache
def _lax_scan_grad():
    """`test_grad_matches_lax_scan`'s reference, once a module."""
    params = cells.gru_params(jax.random.PRNGKey(1), 5, 3)
    init = 0.1 * jnp.ones(5)
    xs = jax.random.normal(jax.random.PRNGKey(2), (48, 3))
    return jax.grad(_gru_loss(None, jax.lax.scan), argnums=(0, 1, 2))(params, init, xs)


@pytest.mark.parametrize(
    "method",
    [ij.QuasiDEER(), ij.QuasiDEER(window=8), ij.QuasiELK(window=8), ij.DEER()],
    ids=["quasi", "quasi-window", "quasi-elk-window", "deer"],
)
def test_linear_recurrences_linearise_once_with_the_same_sweeps(method):
    """The adjoint's linear recurrences take A_t from one linearisation, carried
    with the inputs: the same sweeps and values as linearising at every sweep."""
    from iterjax._iterate import iterative_solve
    from iterjax.sequence._core import Sweeps
    from iterjax.sequence._scan import _linear_sweeps

    T, D = 40, 4
    k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    # Mostly diagonal, varying along t: a misplaced A_t costs sweeps.
    diag = jax.random.uniform(k1, (T, D), minval=-0.95, maxval=0.95)
    J = jax.vmap(jnp.diag)(diag) + 0.05 * jax.random.normal(k2, (T, D, D))
    b = jax.random.normal(k3, (T, D))
    cell = lambda h, inp: inp[0] @ h + inp[1]
    s0 = jnp.zeros(D)
    once = _linear_sweeps((method, 1e-12, 0.0), cell, (J, b), s0)
    every = iterative_solve(
        Sweeps(method, 1e-12, 0.0),
        lambda h, x, _: cell(h, x),
        jnp.zeros((T, D)),
        (s0, (J, b), ()),
        atol=1e-12,
        rtol=0.0,
        max_steps=T + 1,
    )
    assert bool(once.converged) and int(once.num_steps) == int(every.num_steps)
    _close(once.value, every.value, 1e-13)
    ref = jax.lax.scan(lambda h, inp: (cell(h, inp),) * 2, s0, (J, b))[1]
    _close(once.value, ref, 1e-10)
    # DEER is exact on a linear recurrence: its gradients solve it with one scan
    assert method.exact_on_linear() == (type(method) is ij.DEER and not method.window)


@pytest.mark.parametrize("method", [ij.DEER(), ij.Jacobi()], ids=["deer", "jacobi"])
def test_check_grads_forward_and_reverse(method):
    params = cells.gru_params(jax.random.PRNGKey(3), 3, 2)
    xs = jax.random.normal(jax.random.PRNGKey(4), (12, 2))
    loss = jax.jit(_gru_loss(method, ij.scan))  # one trace for every evaluation
    check_grads(loss, (params, jnp.zeros(3), xs), order=1, modes=("fwd", "rev"))


def test_grad_under_jit_and_vmap():
    params = cells.gru_params(jax.random.PRNGKey(5), 4, 2)
    xs = jax.random.normal(jax.random.PRNGKey(6), (3, 40, 2))
    init = jnp.zeros(4)
    mine = jax.jit(jax.vmap(jax.grad(_gru_loss(ij.DEER(), ij.scan)), (None, None, 0)))
    ref = jax.vmap(jax.grad(_gru_loss(None, jax.lax.scan)), (None, None, 0))
    _close(mine(params, init, xs), ref(params, init, xs), 1e-7)


# ----------------------------------------------------------------- errors


def test_carry_changing_shape_is_rejected():
    f = lambda h, x: (jnp.concatenate([h, x[:1]]), None)
    with pytest.raises(ValueError, match="new carry.*shape"):
        ij.scan(f, jnp.zeros(2), jnp.ones((5, 2)))


def test_carry_changing_dtype_or_structure_is_rejected():
    with pytest.raises(ValueError, match="dtype"):
        ij.scan(lambda h, x: (h.astype(jnp.float32), None), jnp.zeros(2), jnp.ones(4))
    with pytest.raises(ValueError, match="structure"):
        ij.scan(lambda h, x: ((h, h), None), jnp.zeros(2), jnp.ones(4))


def test_mismatched_xs_lengths_are_rejected():
    xs = (jnp.ones((5, 2)), jnp.ones((6,)))
    with pytest.raises(ValueError, match="leading axis"):
        ij.scan(lambda h, x: (h, None), jnp.zeros(2), xs)
    with pytest.raises(ValueError, match="length"):
        ij.scan(lambda h, x: (h, None), jnp.zeros(2), jnp.ones(5), length=4)
    with pytest.raises(ValueError, match="length"):
        ij.scan(lambda h, x: (h, None), jnp.zeros(2), None)


@pytest.mark.parametrize("method", [ij.DEER(), ij.Jacobi()], ids=["deer", "jacobi"])
def test_integer_carry_with_parallel_method_is_rejected(method):
    with pytest.raises(TypeError, match="float carry.*Sequential"):
        ij.scan(
            lambda c, x: (c + x, None),
            jnp.int32(0),
            jnp.ones(5, jnp.int32),
            method=method,
        )


def test_lazy_jacobians_reject_a_window_and_bad_periods():
    with pytest.raises(ValueError, match="window"):
        ij.DEER(window=16, jacobian_every=2)
    with pytest.raises(ValueError, match="jacobian_every"):
        ij.DEER(jacobian_every=0)


@pytest.mark.parametrize("window", [0, -3, 2.5])
def test_bad_window_is_rejected(window):
    with pytest.raises(ValueError, match="window"):
        ij.DEER(window=window)
    with pytest.raises(ValueError, match="window"):
        ij.sequence.Picard(window)


def test_bad_arguments_are_rejected():
    f, init, xs = cells.tanh_rnn(dim=2, length=5)
    with pytest.raises(TypeError, match="method"):
        ij.scan(f, init, xs, method=ij.Picard())
    with pytest.raises(ValueError, match="max_sweeps"):
        ij.scan(f, init, xs, max_sweeps=0)
    with pytest.raises(ValueError, match="atol"):
        ij.scan(f, init, xs, atol=-1.0)
    with pytest.raises(ValueError, match="pair"):
        ij.scan(lambda h, x: h, init, xs)
    with pytest.raises(ValueError, match="damping"):
        ij.DEER(damping=1.0)
    with pytest.raises(ValueError, match="block"):
        ij.GaussSeidel(block=0)
    with pytest.raises(ValueError, match="damping"):
        ij.ELK(damping=0.0)
    with pytest.raises(ValueError, match="sigmasq"):
        ij.QuasiELK(sigmasq=-1.0)
    with pytest.raises(TypeError, match="smooth"):
        ij.ELK(smooth="no")


def test_polish_gives_a_cheap_method_deers_error_bound():
    # errors grow 1.03^t: quasi-DEER's own test stops far from lax.scan; polished
    # by DEER sweeps from its solution, the result is within atol, as DEER's own
    f, init, xs = _amplifying()
    _, ref = jax.lax.scan(f, init, xs)
    kw = dict(atol=1e-8, return_stats=True, trace=True)
    _, ys, quasi = ij.scan(f, init, xs, method=ij.QuasiDEER(), **kw)
    assert bool(quasi.converged) and float(jnp.max(jnp.abs(ys - ref))) > 1e-6
    solve = jax.jit(
        lambda xs: ij.scan(f, init, xs, method=ij.QuasiDEER(), polish=ij.DEER(), **kw)
    )
    _, ys, stats = solve(xs)
    assert bool(stats.converged) and float(jnp.max(jnp.abs(ys - ref))) <= 1e-8
    polish_sweeps = int(stats.num_sweeps) - int(quasi.num_sweeps)
    assert 1 <= polish_sweeps <= 5
    # both stages linearise, but for their last sweeps (testing the last update)
    assert int(stats.jacobians) == int(stats.num_sweeps) - 2
    # the trace runs on: the quasi sweeps' entries, then the polishing ones (the
    # first ones compared: the sweeps amplify rounding quickly here, and the two
    # programs round alike only where XLA fuses them alike)
    n = int(quasi.num_sweeps)
    np.testing.assert_allclose(stats.trace[:5], quasi.trace[:5], rtol=1e-12)
    last = int(stats.num_sweeps) - 1
    assert float(stats.trace[last]) <= 1e-8 < float(stats.trace[n - 2])
    # per element under vmap; gradients (through DEER's recurrences) as lax.scan's
    batched = jax.vmap(solve)(jnp.stack([xs, 0.5 * xs]))[2]
    assert int(batched.num_sweeps[0]) == int(stats.num_sweeps)
    loss = lambda scan, xs: jnp.sum(jnp.sin(scan(xs)[1]))
    g = jax.grad(lambda xs: loss(lambda xs: solve(xs)[:2], xs))(xs)
    g_ref = jax.grad(lambda xs: loss(lambda xs: jax.lax.scan(f, init, xs), xs))(xs)
    np.testing.assert_allclose(g, g_ref, rtol=1e-6, atol=1e-8)


def test_polish_must_be_a_parallel_method():
    f = lambda h, x: (jnp.tanh(h + x), h)
    for bad in (ij.Sequential(), "deer"):
        with pytest.raises(TypeError, match="polish"):
            ij.scan(f, jnp.zeros(2), jnp.ones((8, 2)), polish=bad)


# ------------------------------------------- issue 34: the cases that broke


def _impulse_rnn():
    W = jnp.array([[0.5, 0.3], [-0.4, 0.6]])
    xs = jnp.zeros((16, 2)).at[0].set(jnp.array([1.0, -1.0]))
    return (lambda h, x: (jnp.tanh(W @ h + x), h)), jnp.zeros(2), xs


_SWAP = jnp.array([[0.0, 1.0], [1.0, 0.0]])
_CASES = {
    # 0 is a fixed point of f(., 0): the impulse must travel the whole sequence
    "impulse-jacobi": (*_impulse_rnn(), ij.Jacobi()),
    "impulse-window": (*_impulse_rnn(), ij.Jacobi(window=4)),
    "product": (
        lambda h, x: (h * x, h),
        jnp.float64(1.0),
        jnp.array([2.0, 1, 1, 1, 1, 1, 1, 1]),
        ij.Jacobi(),
    ),
    # a zero-diagonal Jacobian: the quasi methods' A_t is 0
    "swap-quasi-deer": (
        lambda h, x: (0.9 * _SWAP @ h + x, h),
        jnp.zeros(2),
        jnp.zeros((8, 2)).at[0].set(jnp.array([0.0, 1.0])),
        ij.QuasiDEER(),
    ),
    "swap-quasi-elk": (
        lambda h, x: (0.9 * _SWAP @ h + x, h),
        jnp.zeros(2),
        jnp.zeros((8, 2)).at[0].set(jnp.array([0.0, 1.0])),
        ij.QuasiELK(),
    ),
}


@pytest.mark.parametrize("case", _CASES)
def test_no_position_is_accepted_behind_a_predecessor_that_moved(case):
    f, init, xs, method = _CASES[case]
    kw = dict(method=method, atol=1e-10, return_stats=True)
    carry, ys, stats = ij.scan(f, init, xs, **kw)
    ref_carry, ref_ys = jax.lax.scan(f, init, xs)
    assert bool(stats.converged)
    _close((carry, ys), (ref_carry, ref_ys), 1e-8)
    assert float(jnp.max(jnp.abs(ref_carry))) > 1e-3  # (the impulse arrives)


def test_jacobi_gradient_through_an_impulse_cotangent():
    # the loss reads the last carry: its cotangent is an impulse for the adjoint
    W = 0.8 * jax.random.normal(jax.random.PRNGKey(0), (3, 3))
    f = lambda h, x: (jnp.tanh(W @ h + x), h)
    xs = jnp.zeros((12, 3)).at[0].set(1.0)

    def loss(xs, method):
        return jnp.sum(ij.scan(f, jnp.zeros(3), xs, method=method)[0] ** 2)

    g = jax.grad(loss)(xs, ij.Jacobi())
    ref = jax.grad(loss)(xs, ij.Sequential())
    assert float(jnp.max(jnp.abs(ref))) > 0.1
    np.testing.assert_allclose(g, ref, atol=1e-5)
    # the tangent sweeps too: the second derivative in the impulse's size
    d2 = lambda m: jax.grad(jax.grad(lambda a: loss(a * xs, m)))(1.0)
    np.testing.assert_allclose(d2(ij.Jacobi()), d2(ij.Sequential()), rtol=1e-5)


def test_atol_zero_is_the_sequential_computation_on_a_chaotic_map():
    logistic = lambda h, _: (3.9 * h * (1 - h), h)
    ref = jax.lax.scan(logistic, 0.3, None, length=50)[1]
    for method in (ij.Jacobi(), ij.DEER(), ij.sequence.Picard()):
        ys = ij.scan(logistic, 0.3, None, length=50, method=method, atol=0.0)[1]
        np.testing.assert_array_equal(ys, ref)
