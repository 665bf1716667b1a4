"""Adjoints: check_grads, agreement between implicit / unrolled / phantom / FD."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import PROBLEMS
from jax.test_util import check_grads

import iterjax as ij

TIGHT = dict(atol=1e-13, max_steps=500)
EXACT = ij.ImplicitAdjoint(ij.BiCGStab(rtol=1e-13))


def _value(adjoint, solver=ij.Anderson()):
    fn, _, y0 = PROBLEMS["tanh"]()
    return jax.jit(
        lambda w, x: (
            ij.fixed_point(
                fn, y0, (w, x), solver=solver, adjoint=adjoint, **TIGHT
            ).value
        )
    )


LINEAR_SOLVERS = [
    ij.GMRES(rtol=1e-12),
    ij.BiCGStab(rtol=1e-12),
    ij.Richardson(atol=1e-14),
    ij.Neumann(terms=150),
]


@pytest.mark.parametrize(
    "linear_solver", LINEAR_SOLVERS, ids=lambda s: type(s).__name__
)
def test_check_grads_implicit(linear_solver):
    _, args, _ = PROBLEMS["tanh"]()
    f = _value(ij.ImplicitAdjoint(linear_solver))
    check_grads(f, args, order=1, modes=("rev", "fwd"), eps=1e-5)


def test_check_grads_implicit_cg_on_symmetric_problem(getkey):
    # With a symmetric Jacobian, I - J is SPD and CG applies.
    n = 6
    m = jax.random.normal(getkey(), (n, n))
    sym = 0.4 * (m + m.T) / jnp.linalg.norm(m + m.T, 2)
    fn = lambda y, p: p[0] @ y + p[1]
    f = jax.jit(
        lambda a, b: (
            ij.fixed_point(
                fn,
                jnp.zeros(n),
                (a, b),
                adjoint=ij.ImplicitAdjoint(ij.CG(rtol=1e-13)),
                **TIGHT,
            ).value
        )
    )
    check_grads(
        lambda b: f(sym, b),
        (jax.random.normal(getkey(), (n,)),),
        order=1,
        modes=("rev",),
    )


@pytest.mark.parametrize(
    "linear_solver",
    [ij.GMRES(rtol=1e-13), ij.BiCGStab(rtol=1e-13)],
    ids=lambda s: type(s).__name__,
)
def test_check_grads_unrolled_through_newtons_krylov_solves(linear_solver, getkey):
    # Unrolling Newton differentiates its linear solves: jax.scipy's GMRES and
    # BiCGStab are custom_linear_solves. (CG's own while_loop cannot be
    # reversed; as a custom_linear_solve with its stats as aux, JAX 0.10 cannot
    # batch it in a hessian: not done.) f(y) = y - 0.3 ∇E(y), E convex.
    n = 6
    spd = lambda m: jnp.eye(n) + 0.2 * (m + m.T) / n
    fn = lambda y, p: y - 0.3 * (spd(p[0]) @ y + jnp.tanh(y) - p[1])
    f = jax.jit(
        lambda m, b: (
            ij.fixed_point(
                fn,
                jnp.zeros(n),
                (m, b),
                solver=ij.Newton(linear_solver=linear_solver),
                adjoint=ij.UnrolledAdjoint(),
                **TIGHT,
            ).value
        )
    )
    args = (jax.random.normal(getkey(), (n, n)), jax.random.normal(getkey(), (n,)))
    check_grads(f, args, order=1, modes=("rev",), eps=1e-5)


def test_check_grads_unrolled():
    _, args, _ = PROBLEMS["tanh"]()
    f = _value(ij.UnrolledAdjoint(), solver=ij.Picard())
    check_grads(f, args, order=1, modes=("rev", "fwd"), eps=1e-5)
    g = _value(ij.UnrolledAdjoint(checkpoint=True), solver=ij.Anderson())
    check_grads(g, args, order=1, modes=("rev",), eps=1e-5)


def test_check_grads_phantom_with_many_steps_is_exact():
    _, args, _ = PROBLEMS["tanh"]()
    f = _value(ij.PhantomAdjoint(steps=120))
    check_grads(f, args, order=1, modes=("rev", "fwd"), eps=1e-5)


def test_adjoints_agree_with_finite_differences(getkey):
    _, (w, x), _ = PROBLEMS["tanh"]()
    c = jax.random.normal(getkey(), x.shape)
    v = jax.random.normal(getkey(), x.shape)
    grads = {}
    for name, adjoint in [
        ("implicit", EXACT),
        ("unrolled", ij.UnrolledAdjoint()),
        ("phantom", ij.PhantomAdjoint(steps=120)),
    ]:
        f = _value(adjoint)
        grads[name] = jax.grad(lambda x: c @ f(w, x))(x)
    f = _value(EXACT)
    eps = 1e-6
    fd = (c @ f(w, x + eps * v) - c @ f(w, x - eps * v)) / (2 * eps)
    for name, g in grads.items():
        np.testing.assert_allclose(g @ v, fd, rtol=1e-6, err_msg=name)
    np.testing.assert_allclose(grads["implicit"], grads["unrolled"], atol=1e-9)


def test_jacobian_free_backprop_formula(getkey):
    # PhantomAdjoint(steps=1): the gradient is that of f(y*, x) with y* held fixed.
    fn, (w, x), y0 = PROBLEMS["tanh"]()
    c = jax.random.normal(getkey(), x.shape)
    f = _value(ij.PhantomAdjoint(steps=1))
    y_star = f(w, x)
    jfb = jax.grad(lambda x: c @ f(w, x))(x)
    expected = jax.grad(lambda x: c @ fn(y_star, (w, x)))(x)
    np.testing.assert_allclose(jfb, expected, atol=1e-12)
    # ... and it is a descent-correlated approximation, not the exact gradient.
    exact = jax.grad(lambda x: c @ _value(ij.ImplicitAdjoint())(w, x))(x)
    assert float(jfb @ exact) > 0
    assert not np.allclose(jfb, exact, atol=1e-3)


def test_phantom_forward_value_is_the_solution():
    _, (w, x), _ = PROBLEMS["tanh"]()
    a = _value(ij.PhantomAdjoint(steps=3, damping=0.5))(w, x)
    b = _value(ij.ImplicitAdjoint())(w, x)
    np.testing.assert_allclose(a, b, atol=0, rtol=0)


def test_initial_guess_gets_zero_gradient_under_implicit():
    fn, args, y0 = PROBLEMS["tanh"]()
    loss = lambda y0: jnp.sum(ij.fixed_point(fn, y0, args, **TIGHT).value)
    np.testing.assert_array_equal(jax.grad(loss)(y0 + 0.3), jnp.zeros_like(y0))
    tangent = jax.jvp(loss, (y0,), (jnp.ones_like(y0),))[1]
    assert float(tangent) == 0.0


def test_unrolled_gradient_reaches_initial_guess_when_not_converged():
    fn = lambda y, a: 0.5 * y + a
    loss = lambda y0: (
        ij.fixed_point(
            fn,
            y0,
            jnp.array(1.0),
            solver=ij.Picard(),
            max_steps=3,
            adjoint=ij.UnrolledAdjoint(),
        ).value
    )
    np.testing.assert_allclose(jax.grad(loss)(jnp.array(0.0)), 0.5**3)


def test_implicit_jvp_matches_grad():
    _, (w, x), _ = PROBLEMS["tanh"]()
    f = _value(EXACT)
    v = jnp.linspace(-1.0, 1.0, x.shape[0])
    jvp = jax.jvp(lambda x: f(w, x), (x,), (v,))[1]
    jac = jax.jacrev(lambda x: f(w, x))(x)
    np.testing.assert_allclose(jvp, jac @ v, atol=1e-10)


def test_grad_wrt_pytree_args_and_integer_leaves():
    # Integer leaves in args (e.g. a step count) must not break differentiation.
    fn = lambda y, a: 0.5 * jnp.tanh(y * a["scale"]) + a["shift"] * a["n"]
    args = {"scale": jnp.array(0.7), "shift": jnp.array(0.2), "n": jnp.array(2)}
    loss = lambda s: (
        ij.fixed_point(fn, jnp.array(0.0), {**args, "scale": s}, **TIGHT).value
    )
    eps = 1e-6
    fd = (loss(0.7 + eps) - loss(0.7 - eps)) / (2 * eps)
    np.testing.assert_allclose(jax.grad(loss)(jnp.array(0.7)), fd, rtol=1e-7)
