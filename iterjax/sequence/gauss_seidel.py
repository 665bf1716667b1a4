"""Gauss-Seidel / hybrid sweeps: sequential inside blocks, Jacobi across them."""

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._checks import check_int
from ._core import AbstractSequenceMethod, shift


class GaussSeidel(AbstractSequenceMethod):
    """Block Gauss-Seidel sweeps.

    The sequence is cut into blocks of `block` steps. Each sweep runs every block
    sequentially (a `lax.scan` of `block` steps) from the current iterate at the
    block's left edge, all blocks in parallel. After k sweeps the first k * block
    positions are exact; `block=1` is Jacobi, `block=T` is `lax.scan`. Parallel
    depth per sweep is `block` instead of 1, sweeps are up to `block` times fewer.

    Attributes:
      block: steps per block (>= 1).

    Example:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> f = lambda h, x: (0.5 * jnp.tanh(h) + x, h)
      >>> xs = jnp.linspace(0.0, 1.0, 64)
      >>> method = iterjax.GaussSeidel(block=8)
      >>> h, ys = iterjax.scan(f, jnp.zeros(()), xs, method=method)
      >>> bool(jnp.allclose(ys, jax.lax.scan(f, jnp.zeros(()), xs)[1], atol=1e-5))
      True
    """

    block: int = struct.field(pytree_node=False, default=8)

    def __post_init__(self):
        super().__post_init__()
        check_int("GaussSeidel", "block", self.block, 1)

    def sweep(self, cell, s0, X, xs, r, A, frozen):
        T = X.shape[0]
        B = min(self.block, T)
        nb = -(-T // B)
        pad = nb * B - T
        edge = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), mode="edge")
        # Accepted positions keep their value, so the first unaccepted one is
        # computed from exactly the accepted predecessor (the core's guarantee).
        inputs = jax.tree_util.tree_map(
            lambda a: edge(a).reshape((nb, B) + a.shape[1:]), (xs, frozen, X)
        )
        starts = shift(X, s0)[::B]  # the iterate left of every block

        def step(h, inp):
            x, keep, old = inp
            h = jnp.where(keep, old, cell(h, x))
            return h, h

        run = lambda h0, inp: jax.lax.scan(step, h0, inp)[1]
        new = jax.vmap(run)(starts, inputs).reshape((nb * B,) + X.shape[1:])[:T]
        return new - X
