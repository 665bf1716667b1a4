"""SOBA, the single-loop stochastic bilevel algorithm (Dagréou et al. 2022)."""

from .. import _tree as tu
from ._stochastic import _info, _soba_update, _Stochastic, _with_finite


class SOBA(_Stochastic):
    """Stochastic Bilevel Algorithm: one step of w, v and θ per minibatch pair.

    Attributes:
      inner_loss, outer_loss: `loss(w, theta, batch) -> scalar`.
      outer_optimizer: optax optimiser for θ (its learning rate is γ).
      inner_lr: ρ, the step size of w and v.
    """

    @property
    def oracles(self) -> tuple[int, int]:
        """(gradients, HVPs) per step, each on a minibatch of each loss."""
        return (2, 2)

    def init(self, theta, w0):
        return self._init(theta, w0, tu.tree_zeros_like(w0))

    def step(self, state, inner_batch=None, outer_batch=None):
        self._check_batches(inner_batch, outer_batch)
        g, f, rho = self.inner_loss, self.outer_loss, self.inner_lr
        w, v, d_t = _soba_update(
            g, f, state.w, state.theta, state.aux, rho, inner_batch, outer_batch
        )
        return _with_finite(self._outer_update(state, d_t, w, v), _info(*self.oracles))
