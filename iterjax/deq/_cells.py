"""Cells whose fixed point exists and is unique by construction."""

import jax
import jax.numpy as jnp
from flax import nnx

from .._checks import check_int, check_range


class ContractiveDense(nnx.Module):
    r"""z ↦ σ(A z + U x + b) with ||A||_∞ <= γ < 1: a contraction in the max norm.

    A rescales a free weight W onto the ∞-norm ball of radius γ (the projection of
    implicit graph networks, Gu et al. 2020; the contractive linear map of
    Convergent Graph Solvers, Park et al. 2021):

        A = W · min(1, γ / ||W||_∞),   ||W||_∞ = max_i Σ_j |W_ij|.

    With σ 1-Lipschitz (tanh, relu, ...) |cell(z) - cell(z')|_∞ <= γ |z - z'|_∞ for
    every x and every W, so by Banach's theorem the fixed point exists, is unique,
    Picard iteration reaches it from any start with error <= γ^k |z_0 - z*|_∞, and
    I - ∂cell/∂z is invertible (the implicit gradient is well defined). Training
    cannot break this: the bound holds for all values of the parameters.

    Args:
      in_features: the size of x's last axis.
      features: the size of z's last axis (z and x may share leading batch axes).
      gamma: the contraction factor γ in (0, 1).
      activation: σ, a 1-Lipschitz function (the caller vouches for this).
      param_dtype: dtype of the parameters.
      rngs: `nnx.Rngs`.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> from flax import nnx
      >>> cell = iterjax.deq.ContractiveDense(3, 5, gamma=0.5, rngs=nnx.Rngs(0))
      >>> float(cell.lipschitz_bound()) <= 0.5
      True
      >>> deq = iterjax.deq.DEQ(cell, solver=iterjax.Picard(), atol=1e-5)
      >>> deq(jnp.ones(3, jnp.float32), jnp.zeros(5, jnp.float32)).shape
      (5,)
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        gamma: float = 0.9,
        activation=jnp.tanh,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_int("ContractiveDense", "in_features", in_features, 1)
        check_int("ContractiveDense", "features", features, 1)
        check_range("ContractiveDense", "gamma", gamma, 0.0, 1.0, True, True)
        init = jax.nn.initializers.lecun_normal()
        self.w = nnx.Param(init(rngs.params(), (features, features), param_dtype))
        self.u = nnx.Linear(in_features, features, param_dtype=param_dtype, rngs=rngs)
        self.gamma = gamma
        self.activation = activation

    def matrix(self):
        """A, the contractive linear part: ||A||_∞ <= γ."""
        w = self.w[...]
        norm = jnp.max(jnp.sum(jnp.abs(w), axis=1))
        gamma = jnp.asarray(self.gamma, w.dtype)
        return w * (gamma / jnp.maximum(norm, gamma))

    def lipschitz_bound(self):
        """||A||_∞, a bound on the cell's Lipschitz constant in the max norm."""
        return jnp.max(jnp.sum(jnp.abs(self.matrix()), axis=1))

    def __call__(self, z, x):
        return self.activation(z @ self.matrix().T + self.u(x))
