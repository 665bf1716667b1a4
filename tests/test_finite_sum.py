"""finite_sum_fixed_point and VRHalpern: the fixed point of T = (1/n) Σ T_i, under
jit, vmap and grad, in fewer component calls than Halpern for large n."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import iterjax as ij
from iterjax.experiments import halpern_vs_picard
from iterjax.experiments.halpern_vs_picard import component


def game(n, seed=0):
    """n resolvents of bilinear games (`halpern_vs_picard`'s), 12-dimensional:
    each T_i is nonexpansive, so is their mean."""
    return halpern_vs_picard.game(n, dim=6, sigma_min=0.1, noise=1.0, seed=seed)


def exact(a):
    """The fixed point of the mean map, by a dense solve."""
    m, c = a
    mbar = jnp.mean(m, 0)
    rhs = jnp.mean(c - jnp.einsum("nij,nj->ni", m, c), 0)
    return jnp.linalg.solve(jnp.eye(m.shape[-1]) - mbar, rhs)


def solve(a, n, solver=ij.VRHalpern(), **kw):
    y0 = jnp.zeros(a[1].shape[-1])
    kw = dict(atol=1e-9, max_steps=5000) | kw
    return ij.finite_sum_fixed_point(component, y0, a, num_terms=n, solver=solver, **kw)


def test_vr_halpern_reaches_halperns_fixed_point():
    a = game(50)
    vr = solve(a, 50)
    plain = solve(a, 50, solver=ij.Halpern(contraction=1.0))
    assert bool(vr.converged) and bool(plain.converged)
    np.testing.assert_allclose(vr.value, plain.value, atol=1e-8)
    np.testing.assert_allclose(vr.value, exact(a), atol=1e-8)
    # the reported residual is the exact one, of the full map
    full = jnp.mean(jax.vmap(lambda i: component(vr.value, a, i))(jnp.arange(50)), 0)
    assert float(jnp.max(jnp.abs(full - vr.value))) <= 1e-9
    assert int(vr.stats["full_passes"]) >= 1


def test_component_calls_saving_grows_with_n():
    ratios = {}
    for n in [10, 300]:
        a = game(n, seed=n)
        vr = solve(a, n, atol=1e-6)
        plain = solve(a, n, solver=ij.Halpern(contraction=1.0), atol=1e-6)
        assert bool(vr.converged) and bool(plain.converged)
        ratios[n] = n * (int(plain.num_steps) + 1) / int(vr.stats["component_calls"])
    assert ratios[300] > 2.0 and ratios[300] > 2 * ratios[10], ratios


def test_vr_halpern_under_jit_vmap_and_grad():
    m, c = game(20)
    # vmap over the offsets: per-lane solves, each the lane's exact fixed point
    cs = jnp.stack([c, 2.0 * c, c - 1.0])
    out = jax.jit(jax.vmap(lambda c: solve((m, c), 20)))(cs)
    assert bool(jnp.all(out.converged))
    for i in range(3):
        np.testing.assert_allclose(out.value[i], exact((m, cs[i])), atol=1e-8)
    # grad through the implicit adjoint of the full map, against the dense solve
    w = jnp.linspace(-1.0, 1.0, c.shape[-1])
    loss = lambda c: jnp.sum(w * jnp.sin(solve((m, c), 20, atol=1e-12).value))
    ref = lambda c: jnp.sum(w * jnp.sin(exact((m, c))))
    np.testing.assert_allclose(jax.grad(loss)(c), jax.grad(ref)(c), atol=1e-8)


def test_finite_sum_with_any_solver_uses_the_full_map():
    a = game(10)
    sol = solve(a, 10, solver=ij.Anderson())
    assert bool(sol.converged)
    np.testing.assert_allclose(sol.value, exact(a), atol=1e-8)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda a: solve(a, 0), ValueError, "num_terms"),
        (lambda a: ij.VRHalpern(batch=0), ValueError, "batch"),
        (lambda a: ij.VRHalpern(halpern=ij.Picard()), TypeError, "Halpern"),
        (
            lambda a: ij.fixed_point(
                lambda y, a: y, jnp.zeros(2), solver=ij.VRHalpern()
            ),
            TypeError,
            "finite_sum_fixed_point",
        ),
    ],
)
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call(game(3))
