"""Diffusion samplers as step maps (`iterjax.sequence.samplers`), float64.

Forward: each sampler against its paper's update formulas, written out here step by
step in numpy, and its order of accuracy against the closed-form probability-flow
solution of Gaussian data. Then every parallel method of `iterjax.scan` against
sequential sampling, under jit, vmap and grad (w.r.t. the noise and a model weight).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import iterjax as ij
from iterjax.sequence import samplers

SAMPLERS = ["ddim", "plms", "dpm_solver_pp"]
C2 = 0.25  # data variance of the closed-form model


def gaussian_eps(x, t, ab):
    """The exact noise prediction for data N(0, C2 I): E[ε | x_t] = σ x / v."""
    return jnp.sqrt(1 - ab) * x / (ab * C2 + 1 - ab)


def log_snr_grid(n, lo=-5.0, hi=3.0):
    """N steps uniform in λ = log(α/σ), from noise (λ = lo) to data (λ = hi)."""
    lam = jnp.linspace(lo, hi, n + 1)
    return lam, jax.nn.sigmoid(2 * lam)  # ᾱ = α² = e^{2λ} / (1 + e^{2λ})


def net(params):
    """A small nonlinear noise model with a time input: tanh(W x + t b) scaled."""
    W, b = params

    def eps(x, t, ab):
        return jnp.tanh(x @ W + t * b) * jnp.sqrt(1 - ab)

    return eps


@pytest.fixture(scope="module")
def model():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    W = 0.8 * jax.random.normal(k1, (6, 6)) / np.sqrt(6)
    b = jax.random.normal(k2, (6,))
    z = jax.random.normal(k3, (3, 6))  # three noise draws, dimension 6
    t, ab = log_snr_grid(48)
    return (W, b), z, samplers.sampler_steps(t, ab)


def sequential(name, eps, z, steps):
    s = getattr(samplers, name)(eps)
    return s.sample(jax.lax.scan(s.step, s.init(z), steps)[0])


def reference(name, eps, z, t, ab):
    """The papers' update formulas, one step at a time in numpy."""
    x, t, ab = np.asarray(z), np.asarray(t), np.asarray(ab)
    e_hist, d_prev = [], None
    for k in range(len(t) - 1):
        a, a_next = np.sqrt(ab[k]), np.sqrt(ab[k + 1])
        s, s_next = np.sqrt(1 - ab[k]), np.sqrt(1 - ab[k + 1])
        e = np.asarray(eps(jnp.asarray(x), t[k], ab[k]))
        if name == "ddim":  # Song et al. (2021), eq. (12) with σ_t = 0
            x = a_next * (x - s * e) / a + s_next * e
        elif name == "plms":  # Liu et al. (2022), eq. (11) and (12)
            e_hist.insert(0, e)
            c = {
                1: [1],
                2: [3, -1],
                3: [23, -16, 5],
                4: [55, -59, 37, -9],
            }[min(len(e_hist), 4)]
            den = {1: 1, 2: 2, 3: 12, 4: 24}[len(c)]
            ep = sum(ci * ei for ci, ei in zip(c, e_hist)) / den
            # PNDM's transfer φ(x_t, ε, t, t - δ), eq. (11)
            x = (
                a_next / a * x
                - (ab[k + 1] - ab[k])
                / (
                    a
                    * (
                        np.sqrt((1 - ab[k + 1]) * ab[k])
                        + np.sqrt((1 - ab[k]) * ab[k + 1])
                    )
                )
                * ep
            )
        else:  # Lu et al. (2022), Algorithm 2 (DPM-Solver++(2M))
            lam = lambda i: np.log(np.sqrt(ab[i]) / np.sqrt(1 - ab[i]))
            h = lam(k + 1) - lam(k)
            d = (x - s * e) / a
            if d_prev is None:
                D = d
            else:
                r = (lam(k) - lam(k - 1)) / h
                D = (1 + 1 / (2 * r)) * d - d_prev / (2 * r)
            x = s_next / s * x - a_next * (np.exp(-h) - 1) * D
            d_prev = d
    return x


# --- forward --------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_sequential_sampling_is_the_papers_update_formulas(name, model):
    params, z, _ = model
    t, ab = log_snr_grid(12)
    eps = net(params)
    got = sequential(name, eps, z[0], samplers.sampler_steps(t, ab))
    np.testing.assert_allclose(got, reference(name, eps, z[0], t, ab), rtol=1e-12)


@pytest.mark.parametrize(
    "name, order", [("ddim", 1), ("plms", 2), ("dpm_solver_pp", 2)]
)
def test_order_of_accuracy_on_the_closed_form_flow(name, order):
    # Gaussian data: the probability-flow ODE scales x by sqrt(v_t / v_T),
    # v = ᾱ c² + 1 - ᾱ. Doubling N divides the error by 2^order. (PLMS's
    # Adams-Bashforth start has a first-order first step, which bounds its
    # global order by 2.)
    z = jnp.ones(2)

    def error(n):
        t, ab = log_snr_grid(n)
        exact = jnp.sqrt((ab[-1] * C2 + 1 - ab[-1]) / (ab[0] * C2 + 1 - ab[0]))
        x = sequential(name, gaussian_eps, z, samplers.sampler_steps(t, ab))
        return float(jnp.abs(x[0] - exact))

    ratio = error(40) / error(80)
    assert 2**order * 0.85 < ratio < 2**order * 1.15, ratio
    assert error(80) < {1: 0.02, 2: 1e-3}[order]


def test_higher_order_samplers_beat_ddim_at_equal_steps():
    z = jnp.ones(2)
    t, ab = log_snr_grid(20)
    exact = jnp.sqrt((ab[-1] * C2 + 1 - ab[-1]) / (ab[0] * C2 + 1 - ab[0]))
    err = {
        n: float(
            jnp.abs(
                sequential(n, gaussian_eps, z, samplers.sampler_steps(t, ab))[0] - exact
            )
        )
        for n in SAMPLERS
    }
    assert err["plms"] < err["ddim"] / 5 and err["dpm_solver_pp"] < err["ddim"] / 5


# --- parallel methods: jit and vmap ---------------------------------------------

METHODS = {
    "picard": ij.sequence.Picard(),
    "picard-window": ij.sequence.Picard(window=8),
    "picard-increments": "increments",
    "jacobi": ij.Jacobi(),
    "gauss_seidel": ij.GaussSeidel(block=4),
    "quasi_deer": ij.QuasiDEER(),
    "deer": ij.DEER(),
}


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
@pytest.mark.parametrize("name", SAMPLERS)
def test_every_parallel_method_samples_as_sequential_under_jit_and_vmap(
    name, method, model
):
    params, z, steps = model
    s = getattr(samplers, name)(net(params))

    @jax.jit
    @jax.vmap
    def parallel(z):
        if method == "increments":  # a traced pytree in the method, under vmap
            m = ij.sequence.Picard(window=8, diagonal=s.increments(z))
        else:
            m = method
        c, _, stats = ij.scan(
            s.step, s.init(z), steps, method=m, atol=1e-11, return_stats=True
        )
        return s.sample(c), stats

    x, stats = parallel(z)
    ref = jax.vmap(lambda z: sequential(name, net(params), z, steps))(z)
    assert bool(jnp.all(stats.converged))
    assert int(jnp.max(stats.num_sweeps)) <= 49  # at most T (+ the last test)
    np.testing.assert_allclose(x, ref, atol=1e-8, rtol=0)


@pytest.mark.parametrize("name", SAMPLERS)
def test_picard_needs_far_fewer_sweeps_than_steps(name, model):
    # ParaDiGMS's point: the sweeps are set by the flow's smoothness, not by N.
    # A multistep sampler's history needs `increments` (else a sweep a step).
    params, z, _ = model
    t, ab = log_snr_grid(400)
    s = getattr(samplers, name)(net(params))

    @jax.jit
    def sweeps(z, method):
        steps = samplers.sampler_steps(t, ab)
        _, _, stats = ij.scan(
            s.step, s.init(z), steps, method=method, atol=1e-8, return_stats=True
        )
        return stats.num_sweeps, stats.converged

    n, ok = sweeps(z[0], ij.sequence.Picard(diagonal=s.increments(z[0])))
    assert bool(ok) and int(n) < 400 // 6
    n_plain, ok = sweeps(z[0], ij.sequence.Picard())
    assert bool(ok)
    if name == "ddim":  # no history: the diagonal is all ones
        assert int(n_plain) == int(n)
    else:
        assert int(n_plain) > 400 // 2


def test_picard_diagonal_must_match_the_carry(model):
    params, z, steps = model
    s = samplers.plms(net(params))
    with pytest.raises(ValueError, match="`diagonal` must have the carry's"):
        ij.scan(s.step, s.init(z[0]), steps, method=ij.sequence.Picard(diagonal=z[0]))


# --- grad -----------------------------------------------------------------------


@pytest.mark.parametrize("name", SAMPLERS)
def test_gradients_wrt_noise_and_model_weights_match_lax_scan(name, model):
    params, z, steps = model
    target = jnp.linspace(-1.0, 1.0, 6)

    def loss(params, z, parallel):
        s = getattr(samplers, name)(net(params))
        if parallel:
            picard = ij.sequence.Picard(diagonal=s.increments(z))
            c, _ = ij.scan(s.step, s.init(z), steps, method=picard, atol=1e-12)
            x = s.sample(c)
        else:
            x = sequential(name, net(params), z, steps)
        return jnp.sum((x - target) ** 2)

    got = jax.jit(jax.grad(loss, argnums=(0, 1)), static_argnums=2)(params, z[0], True)
    ref = jax.grad(loss, argnums=(0, 1))(params, z[0], False)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(g, r, rtol=1e-7, atol=1e-9)
        assert float(jnp.linalg.norm(r)) > 1e-3


def test_check_grads_through_parallel_plms():
    t, ab = log_snr_grid(10)
    steps = samplers.sampler_steps(t, ab)

    def sample(b, z):
        s = samplers.plms(net((jnp.eye(3) * 0.5, b)))
        c, _ = ij.scan(s.step, s.init(z), steps, method=ij.sequence.Picard(), atol=0.0)
        return s.sample(c)

    check_grads(
        jax.jit(sample),
        (jnp.array([0.3, -0.2, 0.1]), jnp.ones(3)),
        order=1,
        modes=("rev", "fwd"),
    )


# --- bad inputs -----------------------------------------------------------------


def test_nan_noise_gives_nan_samples_and_no_convergence(model):
    params, z, steps = model
    s = samplers.dpm_solver_pp(net(params))
    c, _, stats = ij.scan(
        s.step,
        s.init(z[0].at[2].set(jnp.nan)),
        steps,
        method=ij.sequence.Picard(),
        return_stats=True,
    )
    assert bool(jnp.isnan(s.sample(c)).any()) and not bool(stats.converged)


@pytest.mark.parametrize(
    "times, alpha_bar, match",
    [
        (jnp.ones(1), jnp.full(1, 0.5), "`times` must be 1-D with at least 2"),
        (jnp.ones(3), jnp.full(4, 0.5), "`alpha_bar` must have the shape"),
        (jnp.ones(3), jnp.array([0.1, 0.5, 1.0]), "`alpha_bar` must be in"),
        (jnp.ones(3), jnp.array([0.1, jnp.nan, 0.9]), "`alpha_bar` must be in"),
    ],
)
def test_bad_schedules_raise_naming_the_argument(times, alpha_bar, match):
    with pytest.raises(ValueError, match=match):
        samplers.sampler_steps(times, alpha_bar)


def test_alpha_bar_may_be_a_function_of_time():
    t = jnp.linspace(1.0, 0.01, 5)
    a = samplers.sampler_steps(t, lambda t: jnp.exp(-5 * t))
    b = samplers.sampler_steps(t, jnp.exp(-5 * t))
    for u, v in zip(a, b):
        np.testing.assert_array_equal(u, v)
    np.testing.assert_array_equal(a.alpha_bar_prev[1:], a.alpha_bar[:-1])


# --- generalised Picard: momentum and a state that changes shape (DreamPropeller) --


def test_picard_solves_a_momentum_path_as_sequential():
    # heavy ball on a quadratic: v' = β v - η ∇f(x), x' = x + v'; both parts move
    # by small increments, so plain Picard applies
    A = jnp.diag(jnp.linspace(0.5, 2.0, 5))

    def f(c, eta):
        x, v = c
        v = 0.9 * v - eta * (A @ x)
        return (x + v, v), None

    init = (jnp.ones(5), jnp.zeros(5))
    etas = jnp.full(300, 0.01)
    ref, _ = jax.lax.scan(f, init, etas)
    got, _, stats = jax.jit(
        lambda c: ij.scan(
            f, c, etas, method=ij.sequence.Picard(), atol=1e-12, return_stats=True
        )
    )(init)
    assert bool(stats.converged) and int(stats.num_sweeps) < 300
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-9, rtol=0)


def upsample(h):  # a 2 x 2 image -> 4 x 4 (each pixel repeated)
    return jnp.kron(h, jnp.ones((2, 2), h.dtype))


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
def test_a_coarse_to_fine_path_equals_its_sequential_evaluation(method):
    if method == "increments":
        method = ij.sequence.Picard()
    smooth = lambda h, x: h + 0.05 * (jnp.tanh(h + x) - h)  # a small step a stage
    s = ij.sequence.staged([smooth, smooth, smooth], [upsample, upsample])
    stages = jnp.repeat(jnp.arange(3), jnp.array([10, 15, 20]))
    xs = s.inputs(stages, jnp.linspace(-1.0, 1.0, 45))
    h0 = jnp.array([[0.5, -0.5], [1.0, 0.0]])

    h = h0  # sequentially, with the shapes changing
    for t in range(45):
        if t in (10, 25):
            h = upsample(h)
        h = smooth(h, xs[2][t])

    c, _, stats = jax.jit(
        lambda c: ij.scan(s.step, c, xs, method=method, atol=1e-12, return_stats=True)
    )(s.init(h0))
    assert s.read(c).shape == (8, 8) and bool(stats.converged)
    np.testing.assert_allclose(s.read(c), h, atol=1e-9, rtol=0)
    grad = jax.jit(
        jax.grad(
            lambda h0: jnp.sum(
                s.read(ij.scan(s.step, s.init(h0), xs, method=method, atol=1e-12)[0])
            )
        )
    )(h0)
    ref = jax.grad(lambda h0: jnp.sum(s.read(jax.lax.scan(s.step, s.init(h0), xs)[0])))(
        h0
    )
    np.testing.assert_allclose(grad, ref, atol=1e-8, rtol=1e-8)


def test_staged_needs_one_lift_between_stages():
    with pytest.raises(ValueError, match="3 `steps` need 2 `lifts`, got 1"):
        ij.sequence.staged([abs, abs, abs], [abs])


def test_a_coarse_to_fine_path_under_vmap_and_grad():
    smooth = lambda h, x: h + 0.05 * (jnp.tanh(h + x) - h)
    s = ij.sequence.staged([smooth, smooth], [upsample])
    xs = s.inputs(jnp.repeat(jnp.arange(2), 12), jnp.linspace(-1.0, 1.0, 24))
    h0 = jnp.stack([jnp.eye(2), -jnp.eye(2)])

    def final(h0, scan):
        return jnp.sum(s.read(scan(s.step, s.init(h0), xs)[0]) ** 2)

    picard = lambda f, c, xs: ij.scan(f, c, xs, method=ij.sequence.Picard(), atol=1e-12)
    got = jax.jit(jax.vmap(jax.value_and_grad(lambda h: final(h, picard))))(h0)
    ref = jax.vmap(jax.value_and_grad(lambda h: final(h, jax.lax.scan)))(h0)
    for g, r in zip(got, ref):
        np.testing.assert_allclose(g, r, atol=1e-9, rtol=1e-9)
