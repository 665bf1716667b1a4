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
    rtol |b|₂, so an approximation that misses is reported, not hidden. For a
    window of the latest m gradients, one added at a time, see `SlidingMFAC`.

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


class SlidingMFAC(AbstractLinearSolver):
    """M-FAC over a sliding window of the latest m gradients.

    The same operator as `MFAC`, F = λ I + (1/m) Gᵀ G with G's rows the window's
    gradients (zero rows until m have been pushed), but kept up to date one
    gradient at a time. The state holds G (a ring buffer) and K⁻¹, K = G Gᵀ + m λ
    I. Replacing row i of G by g changes K's row and column i: a symmetric
    rank-2 change e_i uᵀ + u e_iᵀ, whose inverse update by Woodbury costs O(m²)
    after the O(d m) products G g. So `push` costs O(d m + m²) and a product
    F⁻¹ b = (b - Gᵀ K⁻¹ G b)/λ costs O(d m + m²), no factorisation: the costs the
    M-FAC paper states for its sliding window. `refresh()` recomputes K⁻¹ from G
    (O(d m² + m³)) against the rounding that many updates accumulate.

    Attributes:
      rows: the window G [m, d] (flat gradients, oldest overwritten first).
      kinv: K⁻¹ [m, m].
      head: the row the next gradient replaces.
      damping: λ > 0.
      rtol: as for `MFAC`.

    Example:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> window = iterjax.linear.SlidingMFAC.empty(jnp.zeros(10), m=3, damping=0.1)
      >>> G = jax.random.normal(jax.random.key(0), (5, 10))
      >>> for g in G:  # the last 3 stay
      ...     window = window.push(g)
      >>> F = 0.1 * jnp.eye(10) + G[2:].T @ G[2:] / 3
      >>> x = window.solve(F, jnp.ones(10))  # F is not called: only tested by stats
      >>> bool(jnp.allclose(F @ x, 1.0, atol=1e-3))  # float32: updates round
      True
    """

    rows: jax.Array
    kinv: jax.Array
    head: jax.Array
    damping: float = 1e-4
    rtol: float | None = None

    def __post_init__(self):
        check_range("SlidingMFAC", "damping", self.damping, lo=0.0, lo_open=True)
        if self.rtol is not None:
            check_range("SlidingMFAC", "rtol", self.rtol, lo=0.0)

    @classmethod
    def empty(cls, like: PyTree, m: int, damping: float = 1e-4, rtol=None):
        """An empty window of m gradients shaped as `like` (F = λ I)."""
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"SlidingMFAC.empty: `m` must be an int >= 1, got {m!r}")
        check_range("SlidingMFAC", "damping", damping, lo=0.0, lo_open=True)
        flat = tu.ravel(like)[0]
        eye = jnp.eye(m, dtype=flat.dtype)
        rows = jnp.zeros((m, flat.size), flat.dtype)
        return cls(rows, eye / (m * damping), jnp.int32(0), damping, rtol)

    def push(self, gradient: PyTree) -> "SlidingMFAC":
        """The window with `gradient` in place of its oldest row: O(d m + m²)."""
        g = tu.ravel(gradient)[0].astype(self.rows.dtype)
        if g.shape != self.rows.shape[1:]:
            raise ValueError(
                f"SlidingMFAC.push: a gradient of {g.size} entries for a window "
                f"of {self.rows.shape[1]}"
            )
        m, i = self.rows.shape[0], self.head
        e = (jnp.arange(m, dtype=jnp.int32) == i).astype(self.rows.dtype)
        rows = self.rows.at[i].set(g)
        # K's column i changes by δ (the damping m λ on the diagonal stays)
        delta = rows @ g - self.rows @ self.rows[i]
        u = delta - 0.5 * delta[i] * e  # K' = K + e_i uᵀ + u e_iᵀ
        U = jnp.stack([e, u], 1)  # K' = K + U C Uᵀ, C = [[0, 1], [1, 0]]
        KU = self.kinv @ U
        c_inv = jnp.array([[0.0, 1.0], [1.0, 0.0]], rows.dtype)
        small = c_inv + U.T @ KU
        kinv = self.kinv - KU @ jnp.linalg.solve(small, KU.T)
        return self.replace(rows=rows, kinv=kinv, head=(i + 1) % m)

    def refresh(self) -> "SlidingMFAC":
        """K⁻¹ recomputed from the window (O(d m² + m³))."""
        m = self.rows.shape[0]
        K = self.rows @ self.rows.T + m * self.damping * jnp.eye(
            m, dtype=self.rows.dtype
        )
        return self.replace(kinv=jnp.linalg.inv(K))

    def solve(self, matvec, b):
        flat, unravel = tu.ravel(b)
        if flat.shape != self.rows.shape[1:]:
            raise ValueError(
                f"SlidingMFAC: a right-hand side of {flat.size} entries for a "
                f"window of {self.rows.shape[1]}"
            )
        G = self.rows.astype(flat.dtype)
        y = self.kinv.astype(flat.dtype) @ (G @ flat)
        return unravel((flat - G.T @ y) / jnp.asarray(self.damping, flat.dtype))

    def solve_with_stats(self, matvec, b, rtol=None):
        """`(x, LinearStats)`: one product with A, to test |b - A x|₂."""
        x = self.solve(matvec, b)
        rtol = default_rtol(b, rtol, self.rtol)
        return checked_answer(matvec, b, x, rtol * tu.two_norm(b), 1)
