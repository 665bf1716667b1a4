"""iterjax.deq.DEQ: forward equals fixed_point, gradients match unrolled and finite
differences (float64), jit / vmap / grad / inside scan, warm starts, bad input."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

import iterjax as ij
from iterjax.deq import DEQ

D = 6


class Cell(nnx.Module):
    """z -> tanh(W z + U x + b), a contraction for small W."""

    def __init__(self, rngs, scale=0.5):
        self.w = nnx.Linear(D, D, use_bias=False, param_dtype=jnp.float64, rngs=rngs)
        self.u = nnx.Linear(3, D, param_dtype=jnp.float64, rngs=rngs)
        self.scale = scale

    def __call__(self, z, x):
        return jnp.tanh(self.scale * self.w(z) + self.u(x))


def make(adjoint=ij.ImplicitAdjoint(), **kw):
    return DEQ(Cell(nnx.Rngs(0)), adjoint=adjoint, atol=1e-12, **kw)


X = jnp.linspace(-1.0, 1.0, 3)
Z0 = jnp.zeros(D)


def test_forward_is_the_fixed_point():
    deq = make()
    z, sol = deq(X, Z0, return_solution=True)
    assert bool(sol.converged) and int(sol.num_steps) > 3
    np.testing.assert_allclose(deq.cell(z, X), z, atol=1e-11)
    ref = ij.fixed_point(lambda z, _: deq.cell(z, X), Z0, None, atol=1e-12).value
    np.testing.assert_allclose(z, ref, atol=1e-11)
    # The stopping norm is the caller's: the residual is reported in it.
    z2, sol2 = make(norm=ij.two_norm)(X, Z0, return_solution=True)
    np.testing.assert_allclose(sol2.residual, jnp.linalg.norm(deq.cell(z2, X) - z2))


def loss(deq, x):
    return jnp.sum(jnp.sin(deq(x, Z0)))


def test_gradients_match_unrolled_and_finite_differences():
    grad = nnx.jit(nnx.grad(loss))
    g_implicit = grad(make(), X)
    g_unrolled = grad(make(ij.UnrolledAdjoint()), X)
    for a, b in zip(jax.tree.leaves(g_implicit), jax.tree.leaves(g_unrolled)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    # Central differences along a random direction in parameter space.
    deq = make()
    graphdef, params = nnx.split(deq)
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    v = jax.random.normal(jax.random.key(1), flat.shape)
    f = jax.jit(lambda p: loss(nnx.merge(graphdef, unravel(p)), X))
    eps = 1e-6
    fd = (f(flat + eps * v) - f(flat - eps * v)) / (2 * eps)
    g = jax.flatten_util.ravel_pytree(g_implicit)[0]
    np.testing.assert_allclose(g @ v, fd, rtol=1e-5)
    # And with respect to the input.
    fx = jax.jit(lambda x: loss(make(), x))
    gx = jax.grad(fx)(X)
    e = jnp.eye(3)
    fdx = jnp.array(
        [(fx(X + eps * e[i]) - fx(X - eps * e[i])) / (2 * eps) for i in range(3)]
    )
    np.testing.assert_allclose(gx, fdx, rtol=1e-5)


def test_jit_vmap_and_grad_compose():
    deq = make()
    xs = jnp.stack([X, -X, 2 * X])

    @nnx.jit
    def batched_loss(deq, xs):
        return jnp.sum(nnx.vmap(lambda x: deq(x, Z0), in_axes=0)(xs) ** 2)

    value, grads = nnx.jit(nnx.value_and_grad(batched_loss))(deq, xs)
    per_example = sum(float(jnp.sum(deq(x, Z0) ** 2)) for x in xs)
    np.testing.assert_allclose(value, per_example, rtol=1e-12)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def test_inside_scan_with_warm_starts():
    # z_t = DEQ(x_t, z_{t-1}): each solve starts from the previous solution.
    deq = make(solver=ij.Picard())
    xs = X[None] + 0.01 * jnp.arange(8.0)[:, None]

    def step(z, x):
        z, sol = deq(x, z, return_solution=True)
        return z, sol.num_steps

    _, steps = jax.jit(lambda xs: jax.lax.scan(step, Z0, xs))(xs)
    cold = jax.vmap(lambda x: deq(x, Z0, return_solution=True)[1].num_steps)(xs)
    assert int(steps[1:].sum()) < int(cold[1:].sum())


def test_bad_input_raises_clear_errors():
    class Widening(Cell):  # the output has one more entry than z
        def __call__(self, z, x):
            return jnp.concatenate([super().__call__(z, x), z[:1]])

    with pytest.raises(ValueError, match="shape"):
        DEQ(Widening(nnx.Rngs(0)))(X, Z0)
    diverging = DEQ(Cell(nnx.Rngs(0), scale=20.0), atol=1e-12, max_steps=5, throw=True)
    with pytest.raises(Exception, match="converge"):
        jax.block_until_ready(diverging(X, Z0))
    with pytest.raises(TypeError, match="callable"):
        DEQ(3)
    with pytest.raises(TypeError, match="nnx.Module"):
        DEQ(lambda z, x: z)  # a plain function has no state to split


# --- stabilisers: Jacobian penalty, fixed-point correction, contractive cell ---


def test_jacobian_penalty_matches_the_exact_frobenius_norm():
    deq = make()
    z = deq(X, Z0)
    J = jax.jacfwd(lambda z: deq.cell(z, X))(z)
    exact = float(jnp.sum(J**2))
    S = 4000
    est = float(deq.jacobian_penalty(X, z, jax.random.key(0), num_samples=S))
    # Var ||J v||^2 = 2 ||J^T J||_F^2 for Gaussian v: within 4 standard errors.
    sigma = float(jnp.sqrt(2.0 * jnp.sum((J.T @ J) ** 2) / S))
    assert abs(est - exact) < 4 * sigma, (est, exact, sigma)
    assert sigma < 0.1 * exact  # the check has teeth
    # A pytree z: the norm of the block Jacobian is the sum over blocks.
    W = jnp.array([[0.3, -0.2], [0.1, 0.4]])
    fn = lambda t: {"a": W @ t["a"], "b": 2.0 * t["b"]}
    t = {"a": jnp.ones(2), "b": jnp.ones(3)}
    raw_key = jax.random.PRNGKey(1)  # raw uint32 keys work too
    est = ij.deq.jacobian_penalty(fn, t, raw_key, num_samples=20000)
    np.testing.assert_allclose(est, jnp.sum(W**2) + 3 * 4.0, rtol=0.03)


def test_jacobian_penalty_is_differentiable():
    # At a fixed key the estimate is a smooth function of the parameters.
    z = jnp.linspace(-0.5, 0.5, D)
    key = jax.random.key(2)

    def penalty(w, b):
        fn = lambda z: jnp.tanh(w @ z + b)
        return ij.deq.jacobian_penalty(fn, z, key, num_samples=3)

    w = 0.3 * jax.random.normal(jax.random.key(3), (D, D))
    check_grads(penalty, (w, jnp.ones(D)), order=2, modes=["rev"])


def test_fixed_point_correction_gradients_are_phantom_gradients():
    # loss(z_i) differentiated equals the DEQ with PhantomAdjoint(steps=i).
    deq = make()
    z_star = deq(X, Z0)
    zs = deq.fixed_point_correction(X, z_star, steps=2, damping=0.5)
    np.testing.assert_allclose(zs, jnp.stack([z_star, z_star]), atol=1e-11)
    for i in (1, 2):

        def corrected(deq, x):
            zs = deq.fixed_point_correction(x, deq(x, Z0), steps=2, damping=0.5)
            return jnp.sum(jnp.sin(zs[i - 1]))

        want = nnx.jit(nnx.grad(loss))(make(ij.PhantomAdjoint(i, 0.5)), X)
        got = nnx.jit(nnx.grad(corrected))(deq, X)
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12)


def test_contractive_dense_is_a_contraction_for_any_weights():
    cell = ij.deq.ContractiveDense(
        3, D, gamma=0.6, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
    )
    cell.w[...] = 50.0 * cell.w[...]  # training cannot leave the ball
    assert float(cell.lipschitz_bound()) <= 0.6 + 1e-12
    z1, z2 = jax.random.normal(jax.random.key(4), (2, 64, D))
    xs = jnp.broadcast_to(X, (64, 3))
    lhs = jnp.max(jnp.abs(cell(z1, xs) - cell(z2, xs)), axis=-1)
    assert bool(jnp.all(lhs <= 0.6 * jnp.max(jnp.abs(z1 - z2), axis=-1)))
    # Picard from any start reaches the unique fixed point at rate gamma.
    deq = DEQ(cell, solver=ij.Picard(), atol=1e-10, max_steps=200)
    za, sa = deq(X, Z0, return_solution=True)
    zb = deq(X, 10.0 * jnp.ones(D))
    np.testing.assert_allclose(za, zb, atol=1e-9)
    assert int(sa.num_steps) <= int(np.ceil(np.log(1e-10 / 2.0) / np.log(0.6))) + 1
    # Batched z and x (leading axes) act row-wise.
    zs = cell(jnp.zeros((4, D)), jnp.stack([X] * 4))
    np.testing.assert_allclose(zs[2], cell(Z0, X), atol=1e-15)


def test_stabilisers_reject_bad_input():
    with pytest.raises(ValueError, match="gamma"):
        ij.deq.ContractiveDense(3, D, gamma=1.0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="features"):
        ij.deq.ContractiveDense(3, 0, rngs=nnx.Rngs(0))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="shape"):
        ij.deq.jacobian_penalty(lambda z: z[:2], jnp.zeros(3), key)
    with pytest.raises(ValueError, match="num_samples"):
        ij.deq.jacobian_penalty(lambda z: z, jnp.zeros(3), key, num_samples=0)
    with pytest.raises(TypeError, match="float"):
        ij.deq.jacobian_penalty(lambda z: z, jnp.zeros(3, jnp.int32), key)
    with pytest.raises(ValueError, match="steps"):
        ij.deq.fixed_point_correction(lambda z: z, jnp.zeros(3), steps=0)
    with pytest.raises(ValueError, match="damping"):
        ij.deq.fixed_point_correction(lambda z: z, jnp.zeros(3), damping=1.5)


# --- the linen wrapper ---


def test_linen_deq_forward_and_gradients():
    import flax.linen as nn

    class LinenCell(nn.Module):
        @nn.compact
        def __call__(self, z, x):
            w = nn.Dense(D, use_bias=False, param_dtype=jnp.float64, name="w")
            u = nn.Dense(D, param_dtype=jnp.float64, name="u")
            return jnp.tanh(0.5 * w(z) + u(x))

    def layer(adjoint):
        return ij.deq.linen.DEQ(LinenCell(), adjoint=adjoint, atol=1e-12)

    params = layer(ij.ImplicitAdjoint()).init(jax.random.key(0), X, Z0)
    z = layer(ij.ImplicitAdjoint()).apply(params, X, Z0)
    cell = lambda z: LinenCell().apply({"params": params["params"]["cell"]}, z, X)
    np.testing.assert_allclose(cell(z), z, atol=1e-11)

    def loss(params, x, adjoint=ij.ImplicitAdjoint()):
        return jnp.sum(jnp.sin(layer(adjoint).apply(params, x, Z0)))

    g = jax.jit(jax.grad(loss))(params, X)
    g_unrolled = jax.jit(jax.grad(lambda p, x: loss(p, x, ij.UnrolledAdjoint())))(
        params, X
    )
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_unrolled)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    check_grads(lambda x: loss(params, x), (X,), order=1, modes=["rev"])
    # vmap over inputs: per-example solves
    zs = jax.vmap(lambda x: layer(ij.ImplicitAdjoint()).apply(params, x, Z0))(
        jnp.stack([X, -X])
    )
    np.testing.assert_allclose(zs[0], z, atol=1e-11)


def _graphs(batch=(), n=7, seed=0):
    """Random directed graphs (isolated nodes included), node and edge features."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    adjacency = jax.random.bernoulli(k1, 0.35, (*batch, n, n))
    adjacency = adjacency.at[..., 0, :].set(False)  # node 0 has no in-neighbours
    x = jax.random.normal(k2, (*batch, n, 3))
    edges = jax.random.normal(k3, (*batch, n, n, 2))
    return x, adjacency, edges


def _cgs(**kw):
    kw = dict(edge_features=2, hidden=5, heads=3, gamma=0.8, atol=1e-12) | kw
    kw.setdefault("param_dtype", jnp.float64)
    return ij.deq.ConvergentGraphSolver(3, 2, rngs=nnx.Rngs(0), **kw)


@pytest.mark.parametrize(
    "scale", [1.0, 1e4, 1e300, 0.0], ids=["plain", "large", "huge", "constant"]
)
def test_graph_transition_rows_sum_to_gamma_whatever_the_logits(scale):
    _, adjacency, _ = _graphs()
    logits = scale * jax.random.normal(jax.random.key(5), (7, 7, 3))
    a = ij.deq.graph_transition(logits, adjacency, 0.8)
    assert a.shape == (3, 7, 7) and bool(jnp.all(a >= 0))
    assert bool(jnp.all(jnp.where(adjacency[None], True, a == 0)))  # edges only
    has_in = jnp.any(adjacency, axis=-1)
    want = jnp.where(has_in, 0.8, 0.0)
    np.testing.assert_allclose(jnp.sum(a, axis=-1), jnp.broadcast_to(want, (3, 7)))
    # NaN in, NaN out: never a finite transition from a NaN logit
    bad = ij.deq.graph_transition(logits.at[2, 1, 0].set(jnp.nan), adjacency, 0.8)
    if bool(adjacency[2, 1]):
        assert bool(jnp.all(jnp.isnan(bad[0, 2])))


def test_cgs_is_the_linear_solve_per_head():
    cgs = _cgs()
    x, adjacency, edges = _graphs()
    y, sol = cgs(x, adjacency, edges, return_solution=True)
    assert bool(sol.converged)
    a, b, h = cgs.transition(x, adjacency, edges)
    z = jnp.stack([jnp.linalg.solve(jnp.eye(7) - a[k], b[:, k]) for k in range(3)], -1)
    np.testing.assert_allclose(y, cgs.decoder(jnp.concatenate([z, h], -1)), atol=1e-10)
    # a batch of graphs (leading axes) is the graphs one by one
    xs, adjs, es = _graphs(batch=(4,), seed=1)
    call = nnx.jit(lambda cgs, x, a, e: cgs(x, a, e))
    ys = call(cgs, xs, adjs, es)
    for i in range(4):
        np.testing.assert_allclose(ys[i], call(cgs, xs[i], adjs[i], es[i]), atol=1e-10)


def test_cgs_contracts_for_any_parameters():
    cgs = _cgs(solver=ij.Picard(), activation=jnp.tanh, max_steps=500)
    for layer in (cgs.edge, cgs.source, cgs.encoder):
        layer.kernel[...] = 1e3 * layer.kernel[...]  # training cannot break it
    x, adjacency, edges = _graphs()
    _, sol = cgs(x, adjacency, edges, return_solution=True)
    assert bool(sol.converged)
    _, b, _ = cgs.transition(x, adjacency, edges)
    # Picard from 0 at rate γ: |z_k - z*| <= γ^k |z*| with |z*| <= |b| / (1 - γ)
    bound = np.log(1e-12 * 0.2 / float(jnp.max(jnp.abs(b)))) / np.log(0.8)
    assert int(sol.num_steps) <= int(np.ceil(bound)) + 1


def test_cgs_gradients_match_unrolled_and_finite_differences():
    x, adjacency, edges = _graphs()

    def loss(cgs, x):
        return jnp.sum(jnp.sin(cgs(x, adjacency, edges)))

    grad = nnx.jit(nnx.grad(loss))
    g_implicit = grad(_cgs(), x)
    g_unrolled = grad(_cgs(adjoint=ij.UnrolledAdjoint()), x)
    for a, b in zip(jax.tree.leaves(g_implicit), jax.tree.leaves(g_unrolled)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)
    graphdef, params = nnx.split(_cgs())
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    v = jax.random.normal(jax.random.key(2), flat.shape)
    f = jax.jit(lambda p: loss(nnx.merge(graphdef, unravel(p)), x))
    eps = 1e-6
    fd = (f(flat + eps * v) - f(flat - eps * v)) / (2 * eps)
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(g_implicit)[0] @ v, fd, rtol=1e-6
    )


def test_cgs_rejects_bad_input():
    x, adjacency, edges = _graphs()
    with pytest.raises(ValueError, match="edge_features=2, called with edges None"):
        _cgs()(x, adjacency)
    with pytest.raises(ValueError, match="gamma"):
        _cgs(gamma=1.0)
    with pytest.raises(ValueError, match="heads"):
        _cgs(heads=0)


def _thompson(u, v):
    return float(jnp.max(jnp.abs(jnp.log(u) - jnp.log(v))))


def test_subhomogeneous_dense_meets_its_condition_for_any_weights():
    cell = ij.deq.SubhomogeneousDense(
        3, D, mu=0.4, param_dtype=jnp.float64, rngs=nnx.Rngs(0)
    )
    cell.w[...] = 1e3 * cell.w[...]  # no norm bound is needed
    fn = lambda z: cell(z, X)
    zs = jnp.exp(4.0 * jax.random.normal(jax.random.key(3), (32, D)))  # e^-12..e^12
    ratios = jax.vmap(lambda z: ij.deq.subhomogeneity(fn, z))(zs)
    assert bool(jnp.all(ratios <= 0.4 + 1e-12)), ratios
    # a μ-contraction in Thompson's metric: one fixed point from any positive start
    deq = DEQ(cell, solver=ij.Picard(), atol=1e-12, max_steps=300)
    solve = nnx.jit(lambda deq, z0: deq(X, z0))
    z_star = solve(deq, jnp.ones(D))
    np.testing.assert_allclose(solve(deq, 1e6 * jnp.ones(D)), z_star, rtol=1e-10)
    z = 1e-3 * jnp.ones(D)
    d0 = _thompson(z, z_star)
    for k in range(1, 8):
        z = fn(z)
        assert _thompson(z, z_star) <= 0.4**k * d0 * (1 + 1e-9) + 1e-12
    # and the implicit gradient is the unrolled one
    loss = lambda deq: jnp.sum(jnp.log(deq(X, jnp.ones(D))))
    grad = nnx.jit(nnx.grad(loss))
    g_implicit = grad(DEQ(cell, atol=1e-12))
    g_unrolled = grad(DEQ(cell, adjoint=ij.UnrolledAdjoint(), atol=1e-12))
    for a, b in zip(jax.tree.leaves(g_implicit), jax.tree.leaves(g_unrolled)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-10)


def test_subhomogeneity_measures_and_refutes():
    z = jnp.array([0.5, 2.0, 7.0])
    np.testing.assert_allclose(ij.deq.subhomogeneity(lambda z: z**0.3, z), 0.3)
    assert float(ij.deq.subhomogeneity(lambda z: 2.0 * z, z)) >= 1.0  # homogeneous
    w = jnp.array([[0.0, -5.0, 1.0], [2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert float(ij.deq.subhomogeneity(lambda z: jnp.tanh(w @ z), z)) == np.inf
    nan = ij.deq.subhomogeneity(lambda z: z**0.3 * jnp.nan, z)
    assert not bool(jnp.isfinite(nan))
    with pytest.raises(ValueError, match="mu"):
        ij.deq.SubhomogeneousDense(3, D, mu=1.0, rngs=nnx.Rngs(0))
