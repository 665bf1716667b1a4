"""Cells whose fixed point exists and is unique by construction."""

import jax
import jax.numpy as jnp
from flax import nnx

from .._checks import check_int, check_range
from .._tree import nan_safe_max


def _weights(cell, in_features, features, param_dtype, rngs):
    """(W, U) of a dense cell z, x -> σ(W z + U x + b): W a (features x features)
    LeCun-normal parameter, U x + b an `nnx.Linear`; sizes checked."""
    owner = type(cell).__name__
    check_int(owner, "in_features", in_features, 1)
    check_int(owner, "features", features, 1)
    init = jax.nn.initializers.lecun_normal()
    w = nnx.Param(init(rngs.params(), (features, features), param_dtype))
    u = nnx.Linear(in_features, features, param_dtype=param_dtype, rngs=rngs)
    return w, u


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
        check_range("ContractiveDense", "gamma", gamma, 0.0, 1.0, True, True)
        self.w, self.u = _weights(self, in_features, features, param_dtype, rngs)
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


def subhomogeneity(fn, z):
    """The subhomogeneity ratio of `fn` at a positive point z (a 1-d array):

        μ̂(z) = max_i (|∂fn/∂z| z)_i / fn(z)_i,

    inf when fn(z) has an entry <= 0 (or z one < 0). A map with μ̂(z) <= μ < 1 at
    every z > 0 is μ-subhomogeneous: it is then a μ-contraction in Thompson's
    metric d(u, v) = |log u - log v|_∞ on the positive orthant, so its fixed point
    exists, is unique and Picard iteration reaches it from any positive start
    (nonlinear Perron-Frobenius theory; Sittoni & Tudisco 2024, "Subhomogeneous
    Deep Equilibrium Models"). Evaluated at sample points this is a check, not a
    proof: a ratio >= 1 anywhere refutes the condition; ratios < 1 at samples
    support it. Dense Jacobian (`jax.jacfwd`): for moderate sizes.
    """
    value = fn(z)
    jac = jax.jacfwd(fn)(z)
    ratio = (jnp.abs(jac) @ z) / jnp.where(value > 0, value, 1.0)
    valid = jnp.all(value > 0) & jnp.all(z >= 0)
    return jnp.where(valid, nan_safe_max(ratio), jnp.inf)


class SubhomogeneousDense(nnx.Module):
    r"""z ↦ (1 + |W| relu(z) + softplus(U x + b))^μ: μ-subhomogeneous for every W.

    With a_i = (|W| z)_i + c_i (c = softplus(U x + b) >= 0) and σ(t) = (1 + t)^μ,
    (|∂F/∂z| z)_i = σ'(a_i) (|W| z)_i <= a_i σ'(a_i) <= μ σ(a_i) = μ F_i(z) on the
    positive orthant, since t σ'(t) = μ t (1 + t)^{μ-1} <= μ (1 + t)^μ. So the
    cell is μ-subhomogeneous and a μ-contraction in Thompson's metric
    (`subhomogeneity`) **whatever the size of W**: unlike `ContractiveDense`, no
    norm bound on the weights is needed, only their magnitudes are used; the
    fixed point exists, is unique and positive (F >= 1), and Picard reaches it
    from any positive start with d(z_k, z*) <= μ^k d(z_0, z*). The relu makes the
    cell a map of all of Rⁿ into [1, ∞)ⁿ, so no other fixed point exists
    outside the orthant either (Anderson, which extrapolates, finds the same).

    Args:
      in_features: the size of x's last axis.
      features: the size of z's last axis.
      mu: μ in (0, 1).
      param_dtype: dtype of the parameters.
      rngs: `nnx.Rngs`.

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> from flax import nnx
      >>> cell = iterjax.deq.SubhomogeneousDense(3, 4, mu=0.5, rngs=nnx.Rngs(0))
      >>> cell.w[...] = 100.0 * cell.w[...]  # any size
      >>> x = jnp.ones(3, jnp.float32)
      >>> z = jnp.ones(4, jnp.float32)
      >>> bool(iterjax.deq.subhomogeneity(lambda z: cell(z, x), z) <= 0.5)
      True
    """

    def __init__(
        self,
        in_features: int,
        features: int,
        *,
        mu: float = 0.5,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        check_range("SubhomogeneousDense", "mu", mu, 0.0, 1.0, True, True)
        self.w, self.u = _weights(self, in_features, features, param_dtype, rngs)
        self.mu = mu

    def __call__(self, z, x):
        # relu(z): the cell is defined everywhere (an extrapolating solver such as
        # Anderson may step outside the orthant) and every fixed point, being a
        # value of the cell, is >= 1: the one of the theorem
        a = jax.nn.relu(z) @ jnp.abs(self.w[...]).T + jax.nn.softplus(self.u(x))
        return (1 + a) ** jnp.asarray(self.mu, a.dtype)
