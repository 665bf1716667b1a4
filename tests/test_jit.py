"""Every solver under jit: same answer as eager, one trace for new argument values."""

import chex
import jax
import numpy as np
import pytest
from helpers import ALL_SOLVERS, IDS, PROBLEMS

import iterjax as ij


@pytest.mark.parametrize("solver", ALL_SOLVERS, ids=IDS)
def test_jit_matches_eager_and_traces_once(solver):
    fn, args, y0 = PROBLEMS["pytree"]()

    @jax.jit
    @chex.assert_max_traces(n=1)
    def solve(a, s):
        return ij.fixed_point(fn, y0, a, solver=s, atol=1e-10, max_steps=400)

    eager = ij.fixed_point(fn, y0, args, solver=solver, atol=1e-10, max_steps=400)
    jitted = solve(args, solver)
    chex.assert_trees_all_close(jitted.value, eager.value, atol=1e-12)
    assert int(jitted.num_steps) == int(eager.num_steps)
    # New argument values (and new float hyperparameters) reuse the compilation.
    other = jax.tree_util.tree_map(lambda a: 0.9 * a, args)
    solve(other, solver)
    if isinstance(solver, ij.Picard):
        solve(other, ij.Picard(damping=0.5))
    chex.clear_trace_counter()


def test_solver_hyperparameters_are_traced_leaves():
    fn, args, y0 = PROBLEMS["tanh"]()
    steps = jax.jit(
        lambda d: ij.fixed_point(fn, y0, args, solver=ij.Picard(damping=d)).num_steps
    )
    assert int(steps(0.5)) > int(steps(1.0))


def test_root_under_jit():
    root = lambda a: ij.root(lambda y, a: y**2 - a, np.float64(1.0), a, atol=1e-14)
    out = jax.jit(lambda a: root(a).value)(2.0)
    np.testing.assert_allclose(out, np.sqrt(2.0), rtol=1e-12)
