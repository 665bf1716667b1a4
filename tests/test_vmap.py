"""Every solver under vmap: per-element step counts, finished lanes frozen."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import ALL_SOLVERS, IDS, PROBLEMS

import iterjax as ij


def _batch(args, scales):
    w, x = args
    return jnp.stack([s * w for s in scales]), jnp.stack([x * (1 + s) for s in scales])


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=IDS)
def test_vmap_equals_individual_solves(solver):
    fn, args, y0 = PROBLEMS["tanh"]()
    scales = [0.1, 0.5, 1.0, 1.15]  # contraction rates differ: so do step counts
    batched = _batch(args, scales)
    kw = dict(solver=solver, atol=1e-10, max_steps=500)
    out = jax.vmap(lambda a: ij.fixed_point(fn, y0, a, **kw))(batched)
    singles = [
        ij.fixed_point(fn, y0, jax.tree_util.tree_map(lambda b: b[i], batched), **kw)
        for i in range(len(scales))
    ]
    steps = [int(s.num_steps) for s in singles]
    np.testing.assert_array_equal(out.num_steps, steps)
    assert len(set(steps)) > 1
    for i, s in enumerate(singles):
        # A lane that finished early is not changed by the later steps of others.
        np.testing.assert_allclose(out.value[i], s.value, atol=1e-13, rtol=0)
        np.testing.assert_allclose(out.residual[i], s.residual, atol=1e-15)
    assert bool(jnp.all(out.converged))


def test_vmap_over_initial_guess_and_hyperparameter():
    fn, args, y0 = PROBLEMS["tanh"]()
    y0s = jnp.stack([y0, y0 + 1.0, y0 - 2.0])
    dampings = jnp.array([1.0, 0.8, 0.6])
    out = jax.vmap(
        lambda y, d: ij.fixed_point(
            fn, y, args, solver=ij.Picard(damping=d), atol=1e-10
        )
    )(y0s, dampings)
    assert bool(jnp.all(out.converged))
    np.testing.assert_allclose(
        out.value, jnp.broadcast_to(out.value[0], out.value.shape), atol=1e-9
    )
    assert int(out.num_steps[2]) > int(out.num_steps[0])


def test_vmap_mixed_convergence_reports_per_lane():
    fn = lambda y, a: a * y + 1.0  # contraction iff |a| < 1
    a = jnp.array([0.5, 1.5, 0.9])
    out = jax.vmap(
        lambda a: ij.fixed_point(
            fn, jnp.array(0.0), a, solver=ij.Picard(), max_steps=300
        )
    )(a)
    np.testing.assert_array_equal(out.converged, [True, False, True])
    np.testing.assert_allclose(out.value[0], 2.0, atol=1e-5)
    np.testing.assert_allclose(out.value[2], 10.0, atol=1e-4)
    assert int(out.result[1]) in (1, 2)


def test_vmap_of_grad_matches_loop():
    fn, args, y0 = PROBLEMS["tanh"]()
    batched = _batch(args, [0.3, 0.7, 1.0])
    loss = lambda a: jnp.sum(ij.fixed_point(fn, y0, a, atol=1e-12).value ** 2)
    vg = jax.vmap(jax.grad(loss))(batched)
    for i in range(3):
        gi = jax.grad(loss)(jax.tree_util.tree_map(lambda b: b[i], batched))
        np.testing.assert_allclose(vg[0][i], gi[0], atol=1e-10)
        np.testing.assert_allclose(vg[1][i], gi[1], atol=1e-10)


def test_vmap_over_float_hyperparameters_of_adjoints_linear_and_bilevel_solvers():
    """Floats are leaves: a batch of adjoints, linear solvers or stochastic
    solvers is one pytree with a leading axis, vmapped like any argument."""
    fn = lambda y, a: a * jnp.tanh(y) + 1.0
    y0, a = jnp.zeros(3), jnp.array(0.5)

    def grad_with(adjoint):
        solve = lambda a: ij.fixed_point(fn, y0, a, adjoint=adjoint, atol=1e-12)
        return jax.grad(lambda a: solve(a).value.sum())(a)

    dampings = jnp.array([0.5, 1.0])
    batched = jax.vmap(grad_with)(ij.PhantomAdjoint(steps=3, damping=dampings))
    singles = [
        grad_with(ij.PhantomAdjoint(steps=3, damping=float(d))) for d in dampings
    ]
    np.testing.assert_allclose(batched, singles, rtol=1e-12)
    assert abs(singles[0] - singles[1]) > 1e-3  # the damping matters

    A = jnp.array([[2.0, 0.5], [0.5, 1.0]])
    b = jnp.array([1.0, -1.0])
    solve = lambda s: s.solve(lambda x: A @ x, b)
    neumann = ij.Neumann(200, damping=jnp.array([0.3, 0.5]))
    np.testing.assert_allclose(
        jax.vmap(solve)(neumann), jnp.stack([jnp.linalg.solve(A, b)] * 2), rtol=1e-9
    )
    cg = ij.CG(rtol=jnp.array([1e-1, 1e-12]), atol=jnp.zeros(2))
    x = jax.vmap(solve)(cg)
    assert float(jnp.max(jnp.abs(x[1] - jnp.linalg.solve(A, b)))) < 1e-10

    g = lambda w, t, batch: 0.5 * jnp.sum((w - t) ** 2)
    f = lambda w, t, batch: 0.5 * jnp.sum(w**2) + 0.1 * jnp.sum(t**2)
    soba = ij.bilevel.SOBA(g, f, optax.sgd(0.1), inner_lr=0.5)

    def first_step(solver):
        state = solver.init(jnp.ones(2), jnp.zeros(2))
        return solver.step(state, None, None)[0].w

    lrs = jnp.array([0.1, 0.5])
    batched = jax.vmap(first_step)(soba.replace(inner_lr=lrs))
    singles = [first_step(soba.replace(inner_lr=float(r))) for r in lrs]
    np.testing.assert_allclose(batched, jnp.stack(singles), rtol=1e-12)
