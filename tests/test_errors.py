"""Bad input raises clear errors naming the culprit; failure is reported, never NaN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iterjax as ij

fn = lambda y, a: 0.5 * y + a
Y0 = jnp.zeros(3)


@pytest.mark.parametrize(
    "bad_fn, match",
    [
        (lambda y, a: {"y": y}, "structure"),
        (lambda y, a: jnp.zeros(4), r"shape \(4,\)"),
        (lambda y, a: y.astype(jnp.float32), "dtype float32"),
        (lambda y, a: (y, y), "structure"),
    ],
)
def test_output_mismatch_raises_naming_it(bad_fn, match):
    with pytest.raises(ValueError, match=match):
        ij.fixed_point(bad_fn, Y0, None)
    with pytest.raises(ValueError, match="fn"):
        ij.fixed_point(bad_fn, Y0, None)


def test_pytree_leaf_mismatch_names_the_leaf():
    y0 = {"a": jnp.zeros(2), "b": jnp.zeros(3)}
    bad = lambda y, _: {"a": y["a"], "b": jnp.zeros(5)}
    with pytest.raises(ValueError, match=r"\['b'\]"):
        ij.fixed_point(bad, y0, None)


def test_integer_initial_guess_raises():
    with pytest.raises(TypeError, match="y0"):
        ij.fixed_point(lambda y, a: y, jnp.zeros(3, jnp.int32), None)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: ij.Anderson(history=0), "history"),
        (lambda: ij.Broyden(history=0), "history"),
        (lambda: ij.Picard(damping=0.0), "damping"),
        (lambda: ij.Picard(damping=1.5), "damping"),
        (lambda: ij.Picard(damping=-0.1), "damping"),
        (lambda: ij.Anderson(mixing=2.0), "mixing"),
        (lambda: ij.Anderson(regularization=-1.0), "regularization"),
        (lambda: ij.PhantomAdjoint(steps=0), "steps"),
        (lambda: ij.PhantomAdjoint(damping=0.0), "damping"),
        (lambda: ij.Neumann(terms=-1), "terms"),
        (lambda: ij.GMRES(restart=0), "restart"),
        (lambda: ij.CG(rtol=-1.0), "rtol"),
        (lambda: ij.Richardson(damping=1.5), "damping"),
        (lambda: ij.Anderson(history=2.5), "history"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(max_steps=0), "max_steps"),
        (dict(max_steps=10.0), "max_steps"),
        (dict(atol=-1.0), "atol"),
        (dict(rtol=-1e-3), "rtol"),
    ],
)
def test_bad_call_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ij.fixed_point(fn, Y0, jnp.ones(3), **kwargs)


def test_wrong_solver_or_adjoint_type():
    with pytest.raises(TypeError, match="solver"):
        ij.fixed_point(fn, Y0, jnp.ones(3), solver="anderson")
    with pytest.raises(TypeError, match="adjoint"):
        ij.fixed_point(fn, Y0, jnp.ones(3), adjoint=ij.GMRES())
    with pytest.raises(TypeError, match="callable"):
        ij.fixed_point(3.0, Y0, jnp.ones(3))


def test_non_convergence_is_reported_not_raised():
    sol = ij.fixed_point(
        lambda y, a: 0.999 * y + 1.0,
        jnp.array(0.0),
        None,
        solver=ij.Picard(),
        max_steps=10,
    )
    assert not bool(sol.converged)
    assert int(sol.result) == 1
    assert np.isfinite(sol.value) and np.isfinite(sol.residual)
    assert "max_steps" in sol.message
    with pytest.raises(ij.NonConvergenceError, match="max_steps"):
        sol.raise_if_failed()


def test_divergence_is_reported_as_nonfinite_and_stops():
    sol = ij.fixed_point(
        lambda y, a: 3.0 * y + 1.0,
        jnp.array(1.0),
        None,
        solver=ij.Picard(),
        max_steps=5000,
    )
    assert not bool(sol.converged)
    assert int(sol.result) == 2
    assert int(sol.num_steps) < 1000  # stopped when it overflowed, not at max_steps
    assert "diverged" in sol.message
    assert bool(jnp.isnan(sol.value))  # never the last finite iterate as an answer


def test_a_nan_parameter_gives_a_nan_value_under_every_adjoint():
    # a DEQ whose parameters went NaN (a NaN gradient step) must not return its
    # start z0 = 0 as a finite answer
    fn = lambda y, w: jnp.tanh(w * y + 1.0)
    for adjoint in (ij.ImplicitAdjoint(), ij.UnrolledAdjoint(), ij.PhantomAdjoint()):
        sol = ij.fixed_point(fn, jnp.zeros(3), jnp.nan, adjoint=adjoint)
        assert int(sol.result) == 2 and bool(jnp.all(jnp.isnan(sol.value)))
        g = jax.grad(lambda w: jnp.sum(ij.fixed_point(fn, jnp.zeros(3), w).value))
        assert bool(jnp.isnan(g(jnp.nan)))


def test_throw_raises_eagerly_with_message():
    with pytest.raises(ij.NonConvergenceError, match="fixed_point did not converge"):
        ij.fixed_point(
            lambda y, a: 0.999 * y + 1.0,
            jnp.array(0.0),
            None,
            solver=ij.Picard(),
            max_steps=10,
            throw=True,
        )
    with pytest.raises(ij.NonConvergenceError, match="root diverged"):
        ij.root(
            lambda y, a: -(y**2) - 1.0,
            jnp.array(0.0),
            None,
            solver=ij.Picard(),
            max_steps=1000,
            throw=True,
        )


def test_throw_raises_under_jit():
    solve = jax.jit(
        lambda a: (
            ij.fixed_point(
                lambda y, a: a * y + 1.0,
                jnp.array(0.0),
                a,
                solver=ij.Picard(),
                max_steps=10,
                throw=True,
            ).value
        )
    )
    np.testing.assert_allclose(solve(0.1), 1 / 0.9, atol=1e-5)  # converges: no error
    with pytest.raises(Exception, match="did not converge"):
        jax.block_until_ready(solve(0.999))


def test_throw_true_converged_does_not_raise_under_vmap_and_grad():
    f = lambda a: (
        ij.fixed_point(
            lambda y, a: a * y + 1.0, jnp.array(0.0), a, throw=True, atol=1e-10
        ).value
    )
    out = jax.jit(jax.vmap(jax.grad(f)))(jnp.array([0.1, 0.5]))
    np.testing.assert_allclose(out, 1 / (1 - jnp.array([0.1, 0.5])) ** 2, rtol=1e-8)


# --- the failures that used to surface deep inside JAX, or not at all ------------


def _cells():
    from flax import linen as nn
    from flax import nnx

    class Cell(nnx.Module):
        def __init__(self, rngs):
            self.w = nnx.Linear(4, 4, rngs=rngs)
            self.u = nnx.Linear(3, 4, rngs=rngs)

        def __call__(self, z, x):
            return jnp.tanh(0.5 * self.w(z) + self.u(x))

    class LinenCell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            return jnp.tanh(0.5 * nn.Dense(4)(z) + nn.Dense(4)(x))

    return Cell, LinenCell


@pytest.mark.parametrize(
    "x_size, z_size, named", [(5, 4, r"z0 float32\[4\], x float32\[5\]"), (3, 5, "z0")]
)
def test_deq_with_wrong_sizes_names_the_layer_and_arguments(x_size, z_size, named):
    from flax import nnx

    Cell, LinenCell = _cells()
    f32 = lambda n, value: jnp.full(n, value, jnp.float32)  # the cells' dtype
    x, z0 = f32(x_size, 1.0), f32(z_size, 0.0)
    deq = ij.deq.DEQ(Cell(nnx.Rngs(0)))
    with pytest.raises(TypeError, match=rf"DEQ\(Cell\): calling the cell .*{named}"):
        deq(x, z0)
    deq(f32(3, 1.0), f32(4, 0.0))  # the right sizes solve
    layer = ij.deq.linen.DEQ(LinenCell())
    params = layer.init(jax.random.key(0), f32(3, 1.0), f32(4, 0.0))
    with pytest.raises((TypeError, ValueError), match=r"DEQ\(LinenCell\): calling"):
        layer.apply(params, x, z0)  # a wrong size at apply (flax's error, named)
    if z_size != 4:  # (linen infers input sizes at init; a wrong state size fails)
        with pytest.raises((TypeError, ValueError), match=r"DEQ\(LinenCell\)"):
            layer.init(jax.random.key(0), x, z0)


def test_fn_failing_on_y0_names_the_call_and_shapes():
    W = jnp.ones((3, 3))
    with pytest.raises(TypeError, match=r"fixed_point: calling fn\(y0, args\) .*y0"):
        ij.fixed_point(lambda y, a: W @ y + a, jnp.zeros(4), 1.0)
    with pytest.raises(TypeError, match=r"scan: calling f\(init, xs\[0\]\) .*init"):
        ij.scan(lambda h, x: (W @ h + x, h), jnp.zeros(4), jnp.ones((5, 3)))


@pytest.mark.parametrize("method", [ij.DEER(), ij.Jacobi(), ij.QuasiDEER(), ij.ELK()])
@pytest.mark.parametrize("reverse", [False, True])
def test_scan_over_an_empty_sequence_is_lax_scan(method, reverse):
    f = lambda h, x: (jnp.tanh(0.5 * h + x), 2 * h)
    init, xs = jnp.ones(3), jnp.zeros((0, 3))
    carry, ys, stats = ij.scan(
        f, init, xs, method=method, reverse=reverse, return_stats=True
    )
    ref = jax.lax.scan(f, init, xs, reverse=reverse)
    np.testing.assert_array_equal(carry, ref[0])
    assert ys.shape == (0, 3) and bool(stats.converged)
    grad = jax.grad(lambda i: ij.scan(f, i, xs, method=method)[0].sum())(init)
    np.testing.assert_array_equal(grad, jnp.ones(3))


def test_traced_invalid_tolerance_is_reported_not_run_to_max_steps():
    solve = lambda atol, rtol=0.0: ij.fixed_point(
        fn, Y0, 1.0, atol=atol, rtol=rtol, max_steps=50
    )
    sol = jax.jit(solve)(-1.0)
    assert int(sol.result) == 4 and int(sol.num_steps) == 0
    assert not bool(sol.converged) and "negative or NaN" in sol.message
    batch = jax.jit(jax.vmap(solve))(jnp.array([1e-8, -1.0, jnp.nan, 1e-8]))
    np.testing.assert_array_equal(batch.result, [0, 4, 4, 0])
    np.testing.assert_allclose(batch.value[0], 2.0, atol=1e-7)  # lanes keep solving
    assert int(jax.jit(solve)(1e-8, -0.5).result) == 4  # rtol too
    picard = jax.jit(lambda t: ij.fixed_point(fn, Y0, 1.0, atol=t, solver=ij.Picard()))
    assert int(picard(-1.0).result) == 4  # the lazy initial evaluation too
    thrown = jax.jit(lambda t: ij.fixed_point(fn, Y0, 1.0, atol=t, throw=True).value)
    with pytest.raises(Exception, match="atol or rtol is negative or NaN"):
        jax.block_until_ready(thrown(-1.0))
    stats = jax.jit(
        lambda t: ij.scan(
            lambda h, x: (h + x, h), 0.0, jnp.ones(4), atol=t, return_stats=True
        )[2]
    )(-1.0)
    assert int(stats.result) == 4 and int(stats.num_sweeps) == 0


def test_argmin_at_a_saddle_or_maximum_says_so():
    saddle = lambda w, t: w[0] ** 2 - w[1] ** 2 + t * jnp.sum(w**2)
    peak = lambda w, t: -jnp.sum((w - t) ** 2)
    convex = lambda w, t: jnp.sum((w - t) ** 2) + jnp.sum(w**4)
    w0 = jnp.array([0.3, 0.2])
    for solver in [ij.Newton(ij.GMRES()), ij.Anderson()]:  # both find any root
        for loss in (saddle, peak):
            # (jitted: one compilation instead of eager dispatch of every primitive)
            run = jax.jit(
                lambda t, loss=loss: ij.argmin(loss, w0, t, solver=solver, atol=1e-8)
            )
            sol = run(0.0)
            assert float(sol.residual) <= 1e-8  # the gradient does vanish there
            assert int(sol.result) == 5 and not bool(sol.converged)
            assert float(sol.stats["curvature"]) < -1.0  # -2 along some direction
            assert "not a minimum" in sol.message and "saddle" in sol.message
            with pytest.raises(ij.NonConvergenceError, match="not a minimum"):
                ij.argmin(loss, w0, 0.0, solver=solver, throw=True)
        sol = jax.jit(lambda t: ij.argmin(convex, w0, t, solver=solver))(1.0)
        assert int(sol.result) == 0 and float(sol.stats["curvature"]) > 0
    # a flat direction is not negative curvature: a minimum of a singular loss
    flat = lambda w, t: (w[0] + w[1] - t) ** 2
    assert int(ij.argmin(flat, w0, 1.0).result) == 0
    # vmapped: each element keeps its own verdict
    batch = jax.vmap(lambda t: ij.argmin(saddle, w0, t, solver=ij.Anderson()))(
        jnp.array([0.0, 2.0])  # t = 2 makes the loss convex
    )
    np.testing.assert_array_equal(batch.result, [5, 0])
    # the probe off
    off = ij.argmin(saddle, w0, 0.0, solver=ij.Anderson(), curvature_steps=0)
    assert int(off.result) == 0 and "curvature" not in off.stats
    with pytest.raises(ValueError, match="curvature_steps"):
        ij.argmin(convex, w0, 1.0, curvature_steps=-1)


def test_vmap_over_an_explicit_mode_batch_points_to_auto_axes():
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((1,), ("b",), axis_types=(AxisType.Explicit,))
    a = jax.device_put(jnp.linspace(0.1, 0.5, 4), NamedSharding(mesh, P("b")))
    f = lambda a: ij.fixed_point(lambda y, a: a * jnp.tanh(y) + 1.0, Y0, a).value
    with jax.set_mesh(mesh):
        with pytest.raises(ValueError, match=r"Explicit mode.*AxisType.Auto"):
            jax.jit(jax.vmap(f))(a)
    auto = jax.make_mesh((1,), ("b",), axis_types=(AxisType.Auto,))
    a = jax.device_put(a, NamedSharding(auto, P("b")))
    with jax.set_mesh(auto):
        assert jax.jit(jax.vmap(f))(a).shape == (4, 3)
