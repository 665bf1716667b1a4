"""SABA: SOBA with SAGA variance reduction (Dagréou et al. 2022)."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int
from ._stochastic import _cross, _grad_w, _hvp, _info, _Stochastic, _with_finite


def _check_indices(name, idx, n):
    """SABA's index batches: a non-empty 1-D int array; concrete indices must lie
    in [0, n) (under jit, out-of-range ones are skipped and counted in
    `info["skipped"]`)."""
    idx = jnp.asarray(idx) if not isinstance(idx, jax.core.Tracer) else idx
    if not jnp.issubdtype(idx.dtype, jnp.integer):
        raise TypeError(f"SABA.step: `{name}` must be integer indices, got {idx.dtype}")
    if idx.ndim != 1 or idx.shape[0] == 0:
        raise ValueError(
            f"SABA.step: `{name}` must be a non-empty 1-D index array, got shape "
            f"{idx.shape}"
        )
    if not isinstance(idx, jax.core.Tracer):
        bad = (idx < 0) | (idx >= n)
        if bool(jnp.any(bad)):
            raise ValueError(
                f"SABA.step: `{name}` holds indices outside [0, {n}): "
                f"{idx[bad].tolist()}"
            )
    return idx


class SabaTables(NamedTuple):
    """Per-sample last directions (leading axis: sample) and their means."""

    inner: Any  # (∇_w g_i, H_i v, ∂²_θw g_i v)
    outer: Any  # (∇_w f_j, ∇_θ f_j)
    inner_mean: Any
    outer_mean: Any


class SABA(_Stochastic):
    """SOBA with SAGA variance reduction over finite sums.

    The oracles are finite sums, `inner_loss(w, theta, idx)` = mean over the
    samples in the int array `idx` (likewise `outer_loss`); `step` takes index
    batches. Memory: one w-sized and one θ-sized row per sample.

    Attributes:
      inner_loss, outer_loss, outer_optimizer: as for `SOBA` (oracles of indices).
      num_inner, num_outer: the numbers of inner and outer samples.
      inner_lr: ρ, the step size of w and v.
    """

    num_inner: int = struct.field(pytree_node=False, default=1)
    num_outer: int = struct.field(pytree_node=False, default=1)

    def __post_init__(self):
        super().__post_init__()
        check_int("SABA", "num_inner", self.num_inner, 1)
        check_int("SABA", "num_outer", self.num_outer, 1)

    def _inner_rows(self, w, theta, v, idx):
        g = self.inner_loss

        def one(i):
            i = i[None]
            return (
                _grad_w(g, w, theta, i),
                _hvp(g, w, theta, i, v),
                _cross(g, w, theta, i, v),
            )

        return jax.vmap(one)(idx)

    def _outer_rows(self, w, theta, idx):
        return jax.vmap(lambda j: jax.grad(self.outer_loss, (0, 1))(w, theta, j[None]))(
            idx
        )

    @property
    def oracles(self) -> tuple[int, int]:
        """(gradients, HVPs) per step, each on a minibatch of each loss."""
        return (2, 2)

    def init(self, theta, w0):
        v0 = tu.tree_zeros_like(w0)
        inner = self._inner_rows(w0, theta, v0, jnp.arange(self.num_inner))
        outer = self._outer_rows(w0, theta, jnp.arange(self.num_outer))
        mean = lambda t: jax.tree.map(lambda a: jnp.mean(a, 0), t)
        tables = SabaTables(inner, outer, mean(inner), mean(outer))
        return self._init(theta, w0, (v0, tables))

    def step(self, state, inner_idx, outer_idx):
        inner_idx = _check_indices("inner_idx", inner_idx, self.num_inner)
        outer_idx = _check_indices("outer_idx", outer_idx, self.num_outer)
        theta, w, (v, tab) = state.theta, state.w, state.aux
        new_in = self._inner_rows(w, theta, v, inner_idx)
        new_out = self._outer_rows(w, theta, outer_idx)

        def saga(new, table, mean, idx, n):
            """(SAGA estimate, updated table, updated mean) of one quantity.
            Indices outside [0, n) (possible only under jit) are skipped."""
            valid = (idx >= 0) & (idx < n)
            shape = (-1,) + (1,) * (table.ndim - 1)
            old = table.at[idx].get(mode="fill", fill_value=0)
            new = jnp.where(valid.reshape(shape), new, old)
            count = jnp.maximum(jnp.sum(valid), 1).astype(table.dtype)
            est = jnp.sum(new - old, 0) / count + mean
            # Duplicate indices: every copy writes the batch's last value for its
            # row (a scatter of differing values to one row is undefined), and the
            # mean moves by (last new - old) once per distinct row: O(batch) work.
            same = idx[:, None] == idx[None, :]
            pos = jnp.arange(idx.shape[0])
            last = jnp.max(jnp.where(same, pos[None, :], -1), axis=1)
            is_last = ((last == pos) & valid).astype(table.dtype).reshape(shape)
            mean2 = mean + jnp.sum(is_last * (new - old), 0) / n
            # The written rows depend on the read ones (a NaN row stays NaN, as
            # it has poisoned the mean anyway), so XLA orders the gather before
            # the scatter and updates the table in place; without the dependence
            # it copied every table on every step (6x slower at 900 samples).
            rows = jnp.where(jnp.isnan(old), old, new[last])
            return est, table.at[idx].set(rows, mode="drop"), mean2

        def apply(new, table, mean, idx, n):
            leaves, treedef = jax.tree.flatten(new)
            rows = zip(
                leaves, treedef.flatten_up_to(table), treedef.flatten_up_to(mean)
            )
            out = [saga(a, b, c, idx, n) for a, b, c in rows]
            return tuple(treedef.unflatten([o[k] for o in out]) for k in range(3))

        (d_w, hv, cross), t_in, m_in = apply(
            new_in, tab.inner, tab.inner_mean, inner_idx, self.num_inner
        )
        (f_w, f_t), t_out, m_out = apply(
            new_out, tab.outer, tab.outer_mean, outer_idx, self.num_outer
        )
        rho = self.inner_lr
        w = tu.tree_axpy(-rho, d_w, w)
        v = tu.tree_axpy(-rho, tu.tree_add(hv, f_w), v)
        d_t = tu.tree_add(f_t, cross)
        tables = SabaTables(t_in, t_out, m_in, m_out)
        # One inner and one outer batch of gradients, HVPs and cross products, as
        # SOBA (evaluated per sample, to fill the tables).
        info = _info(*self.oracles)
        skipped = lambda idx, n: jnp.sum((idx < 0) | (idx >= n), dtype=jnp.int32)
        info["skipped"] = skipped(inner_idx, self.num_inner) + skipped(
            outer_idx, self.num_outer
        )
        return _with_finite(self._outer_update(state, d_t, w, (v, tables)), info)
