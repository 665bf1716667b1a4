"""M-FAC: inverse-Hessian-vector products from m gradients (Frantar et al. 2021)."""

import jax
import jax.numpy as jnp

from .. import _tree as tu
from .._checks import check_range
from .._types import PyTree
from ._base import AbstractLinearSolver, checked_answer
from .krylov import default_rtol


class MFAC(AbstractLinearSolver):
    """Inverse products with the damped empirical Fisher of m gradients (M-FAC).

    With the gradients g_1..g_m as the rows of G (m x d),

        F = λ I + (1/m) Gᵀ G,     F⁻¹ b = (1/λ) (b - Gᵀ (m λ I + G Gᵀ)⁻¹ G b)

    (Woodbury): the m x m Gram matrix G Gᵀ and its Cholesky factor once, O(d m²
    + m³), then O(d m + m²) a product, against the O(d²) of a d x d matrix. M-FAC
    (Frantar, Kurtic & Alistarh 2021) computes the same inverse by m rank-one
    (Sherman-Morrison) updates in O(d m²) and O(d m) a product; where m is well
    below d the two agree in cost and exactly in value.

    As the linear solver of `ImplicitAdjoint`, `argmin` or `hypergradient`, it
    stands F in for the operator A it is given (a Hessian, say) and never calls
    it, except once to test the answer: `converged` holds only when |b - A x|₂ <=
    rtol |b|₂, so an approximation that misses is reported, not hidden. The
    sliding-window variant of the paper (gradients added and dropped one at a
    time) is not implemented.

    Attributes:
      gradients: a pytree like the right-hand side with a leading axis of m
        gradient samples.
      damping: λ > 0.
      rtol: the tolerance of the residual test (None: 1e-8 in float64, the
        Krylov solvers' default).

    Example:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> G = jax.random.normal(jax.random.key(0), (4, 10))  # 4 gradients, d = 10
      >>> F = 0.1 * jnp.eye(10) + G.T @ G / 4                # the damped Fisher
      >>> x, stats = iterjax.MFAC(G, 0.1).solve_with_stats(F, jnp.ones(10))
      >>> bool(stats.converged), bool(jnp.allclose(F @ x, 1.0, atol=1e-4))
      (True, True)
    """

    gradients: PyTree
    damping: float = 1e-4
    rtol: float | None = None

    def __post_init__(self):
        check_range("MFAC", "damping", self.damping, lo=0.0, lo_open=True)
        if self.rtol is not None:
            check_range("MFAC", "rtol", self.rtol, lo=0.0)

    def _matrix(self, b):
        """The gradients as the rows of G [m, d], flattened as b is."""
        leaves, structure = jax.tree.flatten(self.gradients)
        b_leaves, b_structure = jax.tree.flatten(b)
        shapes = [jnp.shape(g)[1:] for g in leaves]
        if structure != b_structure or shapes != [jnp.shape(x) for x in b_leaves]:
            raise ValueError(
                "MFAC: `gradients` must be the right-hand side's pytree with a "
                f"leading axis of samples; got {structure} with shapes "
                f"{[jnp.shape(g) for g in leaves]} for a right-hand side "
                f"{b_structure} with shapes {[jnp.shape(x) for x in b_leaves]}"
            )
        return jax.vmap(lambda g: tu.ravel(g)[0])(self.gradients)

    def solve(self, matvec, b):
        G = self._matrix(b)
        flat, unravel = tu.ravel(b)
        G = G.astype(flat.dtype)
        m, lam = G.shape[0], jnp.asarray(self.damping, flat.dtype)
        gram = G @ G.T + m * lam * jnp.eye(m, dtype=flat.dtype)
        factor = jax.scipy.linalg.cho_factor(gram)
        y = jax.scipy.linalg.cho_solve(factor, G @ flat)
        return unravel((flat - G.T @ y) / lam)

    def solve_with_stats(self, matvec, b, rtol=None):
        """`(x, LinearStats)`: one product with A, to test |b - A x|₂."""
        x = self.solve(matvec, b)
        rtol = default_rtol(b, rtol, self.rtol)
        return checked_answer(matvec, b, x, rtol * tu.two_norm(b), 1)
