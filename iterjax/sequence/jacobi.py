"""Jacobi sweeps: A_t = 0."""

from ._core import AbstractSequenceMethod


class Jacobi(AbstractSequenceMethod):
    """Jacobi (fixed-point) sweeps over the sequence.

        X^{k+1}_t = f(X^k_{t-1}, x_t)      for all t at once

    One parallel evaluation of f per sweep, no derivatives. After k sweeps the
    first k positions are exact (causality); contractive cells converge in a number
    of sweeps set by the contraction rate, not by T.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> f = lambda h, x: (0.5 * jnp.tanh(h) + x, h)
      >>> h, _ = iterjax.scan(f, jnp.zeros(2), jnp.ones((100, 2)),
      ...                     method=iterjax.Jacobi(), atol=1e-10)
      >>> round(float(h[0]), 4)
      1.4476
    """

    # A_t = 0: the default `linearize` of AbstractSequenceMethod.
