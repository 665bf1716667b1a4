"""StocBiO: inner SGD, then a stochastic Neumann series (Ji et al. 2021)."""

import jax

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int
from ._stochastic import (
    _cross,
    _hvp,
    _info,
    _nth,
    _sgd,
    _Stochastic,
    _with_finite,
)


class StocBiO(_Stochastic):
    """Stochastic bilevel optimiser with a Neumann-series inverse Hessian.

    Attributes:
      inner_loss, outer_loss, outer_optimizer: as for `SOBA`.
      inner_lr: η, the inner SGD step and the Neumann step (η < 2 / L_g).
      inner_steps: SGD steps on w per outer step (warm-started).
      neumann_terms: Q, the number of terms of the Neumann series.
    """

    inner_steps: int = struct.field(pytree_node=False, default=10)
    neumann_terms: int = struct.field(pytree_node=False, default=10)

    @property
    def inner_batches(self) -> int:
        """K SGD steps, Q - 1 Neumann products and the cross product."""
        return self.inner_steps + self.neumann_terms

    def __post_init__(self):
        super().__post_init__()
        check_int("StocBiO", "inner_steps", self.inner_steps, 1)
        check_int("StocBiO", "neumann_terms", self.neumann_terms, 1)

    @property
    def oracles(self) -> tuple[int, int]:
        """(gradients, HVPs) per step, each on a minibatch of each loss."""
        return (self.inner_steps + 1, self.neumann_terms)

    def init(self, theta, w0):
        return self._init(theta, w0, tu.tree_zeros_like(w0))

    def step(self, state, inner_batch=None, outer_batch=None):
        self._check_batches(inner_batch, outer_batch)
        g, f, eta = self.inner_loss, self.outer_loss, self.inner_lr
        theta = state.theta

        w = _sgd(g, state.w, theta, inner_batch, eta, self.inner_steps)
        f_w, f_t = jax.grad(f, (0, 1))(w, theta, outer_batch)

        k = self.inner_steps

        def neumann(q, carry):  # term <- (I - ηH) term, total += term
            total, term = carry
            batch = _nth(inner_batch, k + q)
            term = tu.tree_axpy(-eta, _hvp(g, w, theta, batch, term), term)
            return tu.tree_add(total, term), term

        total, _ = jax.lax.fori_loop(0, self.neumann_terms - 1, neumann, (f_w, f_w))
        v = tu.tree_scale(-eta, total)  # ≈ -H⁻¹ ∇_w f
        last = _nth(inner_batch, self.inner_batches - 1)
        d_t = tu.tree_add(f_t, _cross(g, w, theta, last, v))
        info = _info(*self.oracles)
        return _with_finite(self._outer_update(state, d_t, w, v), info)
