"""F2SA: a fully first-order stochastic bilevel method (Kwon et al. 2023)."""

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from ._stochastic import _grad_w, _info, _Stochastic, _with_finite


class F2SA(_Stochastic):
    """Fully first-order stochastic approximation: no second derivatives.

    Attributes:
      inner_loss, outer_loss, outer_optimizer: as for `SOBA`.
      inner_lr: step size of z (on g) and of y (on f/λ + g).
      inner_steps: SGD steps of z and of y per outer step (warm-started).
      lam: the initial penalty λ_0 > 0.
      lam_growth: added to λ after every step (λ_k = λ_0 + k δ).
      lam_max: the cap on λ.
    """

    inner_steps: int = struct.field(pytree_node=False, default=10)
    lam: float = 1.0
    lam_growth: float = 0.1
    lam_max: float = 100.0

    def __post_init__(self):
        super().__post_init__()
        check_int("F2SA", "inner_steps", self.inner_steps, 1)
        check_range("F2SA", "lam", self.lam, lo=0.0, lo_open=True)
        check_range("F2SA", "lam_growth", self.lam_growth, lo=0.0)
        check_range("F2SA", "lam_max", self.lam_max, lo=self.lam)

    @property
    def oracles(self) -> tuple[int, int]:
        """(gradients, HVPs) per step, each on a minibatch of each loss."""
        return (3 * self.inner_steps + 3, 0)

    def init(self, theta, w0):
        lam = jnp.asarray(self.lam, jax.tree.leaves(w0)[0].dtype)
        return self._init(theta, w0, (w0, lam))

    def step(self, state, inner_batch=None, outer_batch=None):
        self._check_batches(inner_batch, outer_batch)
        z, (y, lam) = state.w, state.aux
        steps = (self.inner_steps, self.inner_steps)
        z, y, d_t = _penalty_step(
            self, state.theta, z, y, lam, steps, inner_batch, outer_batch
        )
        lam = jnp.minimum(lam + self.lam_growth, self.lam_max)
        info = _info(*self.oracles)
        return _with_finite(self._outer_update(state, d_t, z, (y, lam)), info)


def _penalty_step(
    solver, theta, z, y, lam, steps, inner_batch, outer_batch, project=None
):
    """The first-order penalty step of F2SA and V-PBGD: `steps[0]` SGD steps of z
    on g, `steps[1]` of y on f/λ + g (step size η = `inner_lr`, each projected by
    `project` when given), and θ's direction

        d = ∇_θ f(y, θ) + λ (∇_θ g(y, θ) - ∇_θ g(z, θ)),

    the gradient in θ of f + λ (g - v̂), v̂ = g(z, θ) ≈ min g. Returns (z, y, d)."""
    g, f, eta = solver.inner_loss, solver.outer_loss, solver.inner_lr
    project = project or (lambda w: w)

    def z_step(_, z):
        return project(tu.tree_axpy(-eta, _grad_w(g, z, theta, inner_batch), z))

    def y_step(_, y):
        d = tu.tree_axpy(
            1.0 / lam,
            _grad_w(f, y, theta, outer_batch),
            _grad_w(g, y, theta, inner_batch),
        )
        return project(tu.tree_axpy(-eta, d, y))

    z = jax.lax.fori_loop(0, steps[0], z_step, z)
    y = jax.lax.fori_loop(0, steps[1], y_step, y)
    g_t = lambda w: jax.grad(g, 1)(w, theta, inner_batch)
    d_t = tu.tree_add(
        jax.grad(f, 1)(y, theta, outer_batch),
        tu.tree_scale(lam, tu.tree_sub(g_t(y), g_t(z))),
    )
    return z, y, d_t
