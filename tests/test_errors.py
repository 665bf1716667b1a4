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
