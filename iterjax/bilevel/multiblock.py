r"""Multi-block bilevel optimisation with blockwise sampling and variance
reduction (after Hu, Qi, Guo & Yang 2023, "Blockwise stochastic variance-reduced
methods with parallel speedup for multi-block bilevel optimization").

m ≫ 1 lower-level problems share the upper variables θ:

    min_θ (1/m) Σ_i f_i(w_i*(θ), θ),    w_i*(θ) = argmin_w g_i(w, θ),

(tasks in meta-learning, one per user, one per class). A step samples I of the
m blocks and a minibatch of each, and for the sampled blocks only takes SOBA's
steps (w_i on g_i; v_i ≈ -H_i⁻¹ ∇_w f_i by one step, Hessian-vector products
only) and their directions d_i = ∇_θ f_i + ∂²_θw g_i v_i. The upper direction is

* without variance reduction, the mean of the sampled d_i, whose variance over
  the choice of blocks stays as m grows;
* with it (`variance_reduction=True`), a SAGA estimate over blocks: a table of
  each block's last direction D_i and its mean D̄, direction D̄ + mean_{i∈I}(d_i -
  D_i), then D_i ← d_i. Its variance vanishes as the blocks settle, so constant
  steps converge. This is the SAGA form (as `SABA` uses over samples), not the
  paper's MSVR estimator, which needs a second evaluation at the previous θ.

A step's work grows with I and the minibatch, not with m (the tables' memory
does: one w, v and θ-sized row a block). With I = m blocks and full batches, a
step is exactly the deterministic multi-block SOBA step.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int
from ._stochastic import _info, _soba_update, _Stochastic


class MultiBlockState(NamedTuple):
    """`BilevelState.aux` of `MultiBlock`: the per-block v [m, ...], the table of
    last directions [m, θ...] and its mean (None without variance reduction)."""

    v: Any
    table: Any
    mean: Any


class MultiBlock(_Stochastic):
    """Blockwise stochastic bilevel optimisation over m lower-level problems.

    `step(state, inner_batch, outer_batch)` takes `inner_batch = (blocks,
    data)`: `blocks` an int array of I **distinct** block indices, `data` a
    pytree whose leaves have a leading axis I (block blocks[j]'s minibatch), and
    `outer_batch` a pytree with a leading axis I aligned with `blocks`. The
    losses are called per block, `inner_loss(w_i, theta, (i, data_i))` and
    `outer_loss(w_i, theta, (i, outer_i))`. `state.w` stacks the m blocks'
    variables (leading axis m).

    Attributes:
      inner_loss, outer_loss, outer_optimizer: as for `SOBA`, per block.
      num_blocks: m.
      blocks_per_step: I, the number of blocks a step samples.
      inner_lr: ρ, the step of each sampled w_i and v_i.
      variance_reduction: SAGA tables over blocks (see the module docstring).
    """

    num_blocks: int = struct.field(pytree_node=False, default=1, kw_only=True)
    blocks_per_step: int = struct.field(pytree_node=False, default=1, kw_only=True)
    variance_reduction: bool = struct.field(
        pytree_node=False, default=True, kw_only=True
    )

    def __post_init__(self):
        super().__post_init__()
        check_int("MultiBlock", "num_blocks", self.num_blocks, 1)
        check_int("MultiBlock", "blocks_per_step", self.blocks_per_step, 1)
        if self.blocks_per_step > self.num_blocks:
            raise ValueError(
                f"MultiBlock: `blocks_per_step` ({self.blocks_per_step}) must be "
                f"<= `num_blocks` ({self.num_blocks})"
            )

    @property
    def oracles(self) -> tuple[int, int]:
        """(gradients, HVPs) per step: SOBA's (2, 2) for each sampled block."""
        return (2 * self.blocks_per_step, 2 * self.blocks_per_step)

    def init(self, theta, w0):
        """θ, and every block's w (and v = 0) at `w0`, one block's variables."""
        stack = lambda t: jax.tree.map(
            lambda a: jnp.broadcast_to(a, (self.num_blocks,) + jnp.shape(a)), t
        )
        W, V = stack(w0), stack(tu.tree_zeros_like(w0))
        if self.variance_reduction:
            aux = MultiBlockState(
                V, stack(tu.tree_zeros_like(theta)), tu.tree_zeros_like(theta)
            )
        else:
            aux = MultiBlockState(V, None, None)
        return self._init(theta, W, aux)

    def step(self, state, inner_batch=None, outer_batch=None):
        self._check_batches(inner_batch, outer_batch)
        blocks, inner_data = inner_batch
        if jnp.shape(blocks) != (self.blocks_per_step,):
            raise ValueError(
                f"MultiBlock.step: `blocks` must hold blocks_per_step = "
                f"{self.blocks_per_step} block indices, got shape {jnp.shape(blocks)}"
            )
        g, f, rho = self.inner_loss, self.outer_loss, self.inner_lr
        theta, (V, table, mean) = state.theta, state.aux
        take = lambda t: jax.tree.map(lambda a: a[blocks], t)
        put = lambda t, new: jax.tree.map(lambda a, b: a.at[blocks].set(b), t, new)

        def block(i, w, v, data_in, data_out):  # SOBA's step on one block
            return _soba_update(g, f, w, theta, v, rho, (i, data_in), (i, data_out))

        W_I, V_I, d = jax.vmap(block)(
            blocks, take(state.w), take(V), inner_data, outer_batch
        )
        W, V = put(state.w, W_I), put(V, V_I)
        if self.variance_reduction:
            change = jax.tree.map(lambda new, old: new - old, d, take(table))
            direction = tu.tree_add(
                mean, jax.tree.map(lambda a: jnp.mean(a, 0), change)
            )
            m = self.num_blocks
            mean = jax.tree.map(lambda a, c: a + jnp.sum(c, 0) / m, mean, change)
            table = put(table, d)
        else:
            direction = jax.tree.map(lambda a: jnp.mean(a, 0), d)
        aux = MultiBlockState(V, table, mean)
        new = self._outer_update(state, direction, W, aux)
        # the rows this step wrote (the others were finite, or an earlier step
        # said so): an O(I) check, not O(m)
        written = (new.theta, W_I, V_I, d, mean)
        return new, {**_info(*self.oracles), "finite": tu.all_finite(written)}
