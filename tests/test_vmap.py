"""Every solver under vmap: per-element step counts, finished lanes frozen."""

import jax
import jax.numpy as jnp
import numpy as np
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
