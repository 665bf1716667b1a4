"""Second derivatives through every implicit adjoint: grad of grad, hessian,
jacfwd(jacrev), jacrev(jacrev) through fixed_point, root, argmin, hypergradient and
scan, against closed forms and unrolled / lax.scan references (float64)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tanh_cell

import iterjax as ij
from iterjax.experiments.common import cells

ORDERS = {
    "grad-grad": lambda f: jax.grad(jax.grad(f)),
    "hessian": jax.hessian,
    "jacfwd-jacrev": lambda f: jax.jacfwd(jax.jacrev(f)),
    "jacrev-jacrev": lambda f: jax.jacrev(jax.jacrev(f)),
}
SOLVERS = [ij.Picard(), ij.Anderson(), ij.Newton(), ij.Halpern()]


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("solver", SOLVERS, ids=lambda s: type(s).__name__)
def test_fixed_point_second_derivative_closed_form(order, solver):
    # y* = 1 / (1 - a):  y*'' = 2 / (1 - a)^3 = 16 at a = 0.5
    y = lambda a: (
        ij.fixed_point(
            lambda y, a: a * y + 1.0,
            jnp.array(0.0),
            a,
            solver=solver,
            atol=1e-13,
            max_steps=2000,
        ).value
    )
    # (jitted: one compilation instead of eager dispatch of every primitive)
    np.testing.assert_allclose(jax.jit(ORDERS[order](y))(0.5), 16.0, rtol=1e-9)


@pytest.mark.parametrize("adjoint", [ij.ImplicitAdjoint(), ij.UnrolledAdjoint()])
def test_fixed_point_hessian_against_unrolled_reference(adjoint):
    _, (w, x), y0 = tanh_cell(n=5)
    loss = lambda x, sol: jnp.sum(jnp.sin(sol) * jnp.arange(1.0, 6.0))

    def solved(x):
        fn = lambda y, a: jnp.tanh(w @ y + a)
        sol = ij.fixed_point(fn, y0, x, adjoint=adjoint, atol=1e-13, max_steps=300)
        return loss(x, sol.value)

    def unrolled(x):  # 300 plain iterations in Python-visible JAX code
        y = jax.lax.fori_loop(0, 300, lambda _, y: jnp.tanh(w @ y + x), y0)
        return loss(x, y)

    np.testing.assert_allclose(
        jax.hessian(solved)(x[:5]), jax.hessian(unrolled)(x[:5]), atol=1e-9
    )


def test_root_second_derivative():
    # y* = sqrt(a): y*'' = -a^{-3/2} / 4
    y = lambda a: ij.root(lambda y, a: y**2 - a, jnp.array(1.0), a, atol=1e-14).value
    np.testing.assert_allclose(jax.grad(jax.grad(y))(2.0), -(2.0**-1.5) / 4, rtol=1e-9)


def test_argmin_and_hypergradient_second_derivatives():
    # inner 0.5 t w^2 - w: w* = 1/t; F(t) = w*^2 = t^-2, F' = -2 t^-3, F'' = 6 t^-4
    inner = lambda w, t: 0.5 * t * w**2 - w
    outer = lambda w, t: w**2
    t = jnp.array(2.0)
    F = lambda t: outer(ij.argmin(inner, jnp.array(0.0), t, atol=1e-13).value, t)
    np.testing.assert_allclose(jax.grad(jax.grad(F))(t), 6 / 16, rtol=1e-9)
    hg = lambda t: ij.hypergradient(outer, inner, t, jnp.array(0.0))
    np.testing.assert_allclose(hg(t), -2 / 8, rtol=1e-9)
    np.testing.assert_allclose(jax.jacfwd(hg)(t), 6 / 16, rtol=1e-9)
    np.testing.assert_allclose(jax.jacrev(hg)(t), 6 / 16, rtol=1e-9)


@pytest.mark.parametrize(
    "method",
    [ij.DEER(), ij.Jacobi(), ij.QuasiDEER(), ij.ELK(damping=0.5)],
    ids=["deer", "jacobi", "quasi", "elk"],
)
def test_scan_hessian_against_lax_scan(method):
    _, init, xs = cells.tanh_rnn(dim=3, length=20, scale=0.7)

    def loss(scan, w, **kw):
        g = lambda h, x: (jnp.tanh(w * h + x), jnp.sum(h))
        c, ys = scan(g, init, xs, **kw)
        return jnp.sum(ys**2) + jnp.sum(c)

    w = jnp.array([0.5, 0.3, -0.2])
    ref = jax.hessian(lambda w: loss(jax.lax.scan, w))(w)
    # (jitted: one compilation instead of eager dispatch of every primitive)
    mine = jax.jit(jax.hessian(lambda w: loss(ij.scan, w, method=method, atol=1e-12)))(
        w
    )
    np.testing.assert_allclose(mine, ref, atol=1e-9)


@pytest.mark.parametrize("order", ORDERS)
def test_phantom_adjoint_refuses_second_derivatives(order):
    # Its second derivative would be that of the phantom steps with y* held
    # fixed (0 here, where the true one is 16): an error, never that number.
    adjoint = ij.PhantomAdjoint(steps=200)

    def f(a):
        fn = lambda y, a: a * y + 1.0
        return ij.fixed_point(
            fn, jnp.array(0.0), a, solver=ij.Picard(), atol=1e-12, adjoint=adjoint
        ).value

    with pytest.raises(ValueError, match="first derivatives only"):
        ORDERS[order](f)(jnp.array(0.5))
    # first derivatives are unchanged: 1 / (1 - a)^2 at a = 0.5 (to the steps)
    np.testing.assert_allclose(jax.grad(f)(0.5), 4.0, rtol=1e-10)
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(f)))(jnp.array([0.5])), 4.0)


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize(
    "adjoint",
    [None, ij.ImplicitAdjoint(ij.GMRES()), ij.UnrolledAdjoint()],
    ids=["implicit", "implicit-gmres", "unrolled"],  # None: root's and argmin's own
)
def test_root_and_argmin_every_order_and_adjoint(order, adjoint):
    # root: y* = sqrt(a), y*'' = -a^{-3/2} / 4; argmin of 0.5 t w^2 - w: w* = 1/t,
    # w*'' = 2 t^-3. Unrolled: a solver without inner loops (Newton's Krylov
    # solves are while_loops, which reverse mode cannot unroll).
    unrolled = isinstance(adjoint, ij.UnrolledAdjoint)
    kw = dict(adjoint=adjoint, solver=ij.LazyNewton(1)) if unrolled else {}
    if adjoint is not None and not unrolled:  # GMRES in the backward solves
        kw = dict(adjoint=adjoint)
    root = lambda a: (
        ij.root(lambda y, a: y**2 - a, jnp.array(1.0), a, atol=1e-14, **kw).value
    )
    d2 = jax.jit(ORDERS[order](root))
    np.testing.assert_allclose(d2(2.0), -(2.0**-1.5) / 4, rtol=1e-9)
    inner = lambda w, t: 0.5 * t * w**2 - w
    argmin = lambda t: ij.argmin(inner, jnp.array(0.0), t, atol=1e-13, **kw)
    w_star = lambda t: argmin(t).value
    np.testing.assert_allclose(jax.jit(ORDERS[order](w_star))(2.0), 2 / 8, rtol=1e-9)
