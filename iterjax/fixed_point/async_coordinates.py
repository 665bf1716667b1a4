"""Asynchronous (chaotic) coordinate updates, simulated: stale random blocks."""

from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int, check_range
from .._iterate import AbstractFixedPointSolver
from .._types import Array, Float, PRNGKeyArray, Y
from ._flat import push, ravel


class AsyncCoordinatesState(NamedTuple):
    residual: Y  # fn(y, args) - y at the current iterate
    images: Float[Array, "delay+1 n"]  # f(y_{k-j}) of the last delay + 1 iterates
    key: PRNGKeyArray  # PRNG key data of the next block draw
    taken: jax.Array  # steps taken, shape=(), int32


class AsyncCoordinates(AbstractFixedPointSolver):
    r"""Fixed-point iteration as asynchronous workers run it: at step k a random
    block B_k of coordinates (each with probability `fraction`) takes its value
    from f evaluated at an iterate `delay` steps old, the others keep theirs:

    $$ y_{k+1, i} = y_{k, i} + α\,(f_i(y_{k-d}) - y_{k, i}) \quad (i ∈ B_k),
       \qquad y_{k+1, i} = y_{k, i} \quad (i ∉ B_k), $$

    with d = min(`delay`, k) (DEGAS-style asynchronous coordinate updates; the
    classical theory is Chazan & Miranker 1969, Bertsekas & Tsitsiklis 1989).
    Where f is a contraction in the max norm (more generally, where the spectral
    radius of |f'| is below 1) such iterations converge for any bounded delay and
    any update pattern that visits every coordinate; where only f' itself is
    contractive they can diverge. It simulates a parallel machine to study that
    behaviour, under `jit`, `vmap` and `grad` (the implicit adjoint needs only
    the fixed point).

    One evaluation of f a step: the images f(y_k) of the last `delay` + 1
    iterates are kept (the residual that the stopping rule tests is f(y_k) - y_k
    at the returned iterate, the current one). `delay` = 0 and `fraction` = 1 is
    `Picard(damping)`.

    Attributes:
      fraction: the probability that a coordinate is updated at a step, (0, 1].
      delay: the staleness d of the values an update reads, >= 0 steps.
      damping: α in (0, 1].
      seed: the PRNG seed of the block draws.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> fn = lambda y, a: 0.5 * jnp.cos(y) + a  # a max-norm contraction
      >>> solver = iterjax.AsyncCoordinates(fraction=0.3, delay=4)
      >>> y0 = jnp.zeros(8)
      >>> sol = iterjax.fixed_point(fn, y0, 0.2, solver=solver, atol=1e-10)
      >>> r = fn(sol.value, 0.2) - sol.value
      >>> bool(sol.converged), bool(jnp.max(jnp.abs(r)) <= 1e-10)
      (True, True)
    """

    fraction: float = 0.5
    delay: int = struct.field(pytree_node=False, default=0)
    damping: float = 1.0
    seed: int = struct.field(pytree_node=False, default=0)

    def __post_init__(self):
        check_range("AsyncCoordinates", "fraction", self.fraction, 0.0, 1.0, True)
        check_int("AsyncCoordinates", "delay", self.delay, 0)
        check_range("AsyncCoordinates", "damping", self.damping, 0.0, 1.0, True)
        check_int("AsyncCoordinates", "seed", self.seed, 0)

    def init(self, fn, y0, args):
        residual = tu.tree_sub(fn(y0, args), y0)
        image, _ = ravel(tu.tree_add(y0, residual))
        images = jnp.broadcast_to(image, (self.delay + 1, image.shape[0]))
        key = jax.random.key_data(jax.random.key(self.seed))
        return AsyncCoordinatesState(residual, images, key, jnp.int32(0))

    def step(self, fn, y, args, state):
        flat, unravel = ravel(y)
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        block = jax.random.bernoulli(sub, self.fraction, flat.shape)
        # the image of y_{k-d}: slot (k - d) mod (delay + 1), d = min(delay, k)
        stale = state.images[
            (state.taken - jnp.minimum(self.delay, state.taken)) % (self.delay + 1)
        ]
        moved = flat + self.damping * (stale - flat)
        y = unravel(jnp.where(block, moved, flat))
        residual = tu.tree_sub(fn(y, args), y)
        image, _ = ravel(tu.tree_add(y, residual))
        taken = state.taken + 1
        images = push(state.images, taken, image)
        return y, AsyncCoordinatesState(
            residual, images, jax.random.key_data(key), taken
        )
