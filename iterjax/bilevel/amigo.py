"""AmIGO: warm-started inner and linear-system SGD (Arbel & Mairal 2022)."""

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


class AmIGO(_Stochastic):
    """Amortized implicit gradient optimisation: warm-started w and v.

    Attributes:
      inner_loss, outer_loss, outer_optimizer: as for `SOBA`.
      inner_lr: step size of w and of v.
      inner_steps: SGD steps on w per outer step.
      v_steps: SGD steps on v (the linear system H v = -∇_w f) per outer step.
    """

    inner_steps: int = struct.field(pytree_node=False, default=5)
    v_steps: int = struct.field(pytree_node=False, default=5)

    @property
    def inner_batches(self) -> int:
        """K SGD steps on w, the v steps and the cross product."""
        return self.inner_steps + self.v_steps + 1

    def __post_init__(self):
        super().__post_init__()
        check_int("AmIGO", "inner_steps", self.inner_steps, 1)
        check_int("AmIGO", "v_steps", self.v_steps, 1)

    @property
    def oracles(self) -> tuple[int, int]:
        """(gradients, HVPs) per step, each on a minibatch of each loss."""
        return (self.inner_steps + 1, self.v_steps + 1)

    def init(self, theta, w0):
        return self._init(theta, w0, tu.tree_zeros_like(w0))

    def step(self, state, inner_batch=None, outer_batch=None):
        self._check_batches(inner_batch, outer_batch)
        g, f, eta = self.inner_loss, self.outer_loss, self.inner_lr
        theta = state.theta

        w = _sgd(g, state.w, theta, inner_batch, eta, self.inner_steps)
        f_w, f_t = jax.grad(f, (0, 1))(w, theta, outer_batch)

        k = self.inner_steps

        def v_step(t, v):
            d = tu.tree_add(_hvp(g, w, theta, _nth(inner_batch, k + t), v), f_w)
            return tu.tree_axpy(-eta, d, v)

        v = jax.lax.fori_loop(0, self.v_steps, v_step, state.aux)
        last = _nth(inner_batch, self.inner_batches - 1)
        d_t = tu.tree_add(f_t, _cross(g, w, theta, last, v))
        info = _info(*self.oracles)
        return _with_finite(self._outer_update(state, d_t, w, v), info)
