"""Picard sweeps for increment recurrences: A_t = I."""

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .._tree import ravel
from .._types import PyTree
from ._core import AbstractSequenceMethod


class Picard(AbstractSequenceMethod):
    """Picard iteration (ParaDiGMS) for recurrences s_t = s_{t-1} + d(s_{t-1}, x_t).

        X^{k+1}_t = s_0 + Σ_{u<=t} d(X^k_{u-1}, x_u)

    i.e. A_t = I: every sweep re-evaluates all increments at the current iterate
    in parallel and takes their prefix sum. Natural for ODE solvers and diffusion
    samplers (the increment is one integrator step), where it converges in far
    fewer sweeps than T when the step size is small. Exact after T sweeps.

    With `window=W` each sweep evaluates only the W steps from the first
    unconverged one, and the window slides forward as its prefix converges
    (ParaDiGMS, Shih et al. 2023): W parallel evaluations per sweep instead of T.

    A carry may also hold values that a step replaces rather than increments (a
    multistep sampler's history of model outputs): there ∂f/∂s is far from I,
    the Picard error does not shrink, and the sweeps grow to T. `diagonal` sets
    A_t = diag(a) with a = 0 on those coordinates (Jacobi updates: they follow
    the increments' coordinates a sweep behind), and 1 on the rest: the
    generalised Picard of DreamPropeller (Zhou et al. 2024) for states that are
    not ODE solutions.

    Attributes:
      window: steps evaluated per sweep (>= 1), or None for the whole sequence.
      diagonal: a pytree with the carry's structure and shapes: 1 where the carry
        integrates increments, 0 where a step replaces it (any a in [0, 1] is a
        valid A_t). None (default): 1 everywhere. `Sampler.increments` gives it
        for `iterjax.sequence.samplers`.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> euler = lambda h, dt: (h + dt * jnp.cos(h), h)   # dh/dt = cos(h)
      >>> h, _ = iterjax.scan(euler, jnp.zeros(1), jnp.full(64, 1 / 64),
      ...                     method=iterjax.sequence.Picard(), atol=1e-10)
      >>> round(float(h[0]), 4)
      0.868
    """

    window: int | None = struct.field(pytree_node=False, default=None)
    diagonal: PyTree | None = None

    def linearize(self, cell, prev, xs):
        fx = jax.vmap(cell)(prev, xs)
        if self.diagonal is None:
            return fx, jnp.ones_like(fx)
        a = ravel(self.diagonal)[0]
        if a.shape != fx.shape[-1:]:
            raise ValueError(
                f"Picard: `diagonal` must have the carry's structure and shapes "
                f"({fx.shape[-1]} values in all), got {a.size} values"
            )
        return fx, jnp.broadcast_to(a.astype(fx.dtype), fx.shape)
