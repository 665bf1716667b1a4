"""Model problems with known structure, shared by tests, benchmarks and
experiments (as in pyamg's and scipy's galleries): operators that expose what
the solvers built for them need (SOR's splitting, a smoother's sweep)."""

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from . import _struct as struct


class Poisson2D(struct.PyTreeNode):
    """-∇·(k∇u) + c u on an n x n interior grid with zero boundary values (5
    points, spacing h = 1 / (n + 1), k given at the nodes and averaged onto the
    edges), matrix-free, on arrays of shape (n, n). k = 1, c = 0 is the model
    Poisson problem; c > 0 (a screened Poisson / implicit heat step) strengthens
    the diagonal, so Jacobi's spectral radius ρ_J and the best SOR ω shrink.

    Attributes:
      k: (n, n) positive coefficients.
      shift: c >= 0 (a scalar, which may be traced).
    """

    k: jax.Array
    shift: float = 0.0

    def _edges(self):
        n = self.k.shape[0]
        h2 = 1.0 / (n + 1) ** 2
        kp = jnp.pad(self.k, 1, mode="edge")
        east = 0.5 * (kp[1:-1, 1:-1] + kp[1:-1, 2:]) / h2
        west = 0.5 * (kp[1:-1, 1:-1] + kp[1:-1, :-2]) / h2
        north = 0.5 * (kp[1:-1, 1:-1] + kp[:-2, 1:-1]) / h2
        south = 0.5 * (kp[1:-1, 1:-1] + kp[2:, 1:-1]) / h2
        return east, west, north, south

    def _neighbours(self, u):
        e, w, n, s = self._edges()
        up = jnp.pad(u, 1)
        return (
            e * up[1:-1, 2:] + w * up[1:-1, :-2] + n * up[:-2, 1:-1] + s * up[2:, 1:-1]
        )

    def __call__(self, u):
        return self.diagonal() * u - self._neighbours(u)

    def diagonal(self):
        e, w, n, s = self._edges()
        return e + w + n + s + self.shift

    def coarsen(self):
        """The same problem on the grid of spacing 2h (n = 2m + 1 -> m points,
        the coarse nodes being the fine ones of odd index), k sampled there:
        the rediscretised operator geometric multigrid uses."""
        n = self.k.shape[0]
        if n % 2 == 0 or n < 3:
            raise ValueError(f"Poisson2D.coarsen: needs an odd n >= 3, got n = {n}")
        return Poisson2D(self.k[1::2, 1::2], self.shift)

    def assemble(self):
        """The operator as a scipy.sparse CSR matrix on the row-major unknowns
        (k and the shift must be concrete, not traced): what algebraic
        multigrid and the peers of `benchmarks/linear.py` take."""
        n = self.k.shape[0]
        east, west, north, south = (np.asarray(a) for a in self._edges())
        index = np.arange(n * n).reshape(n, n)
        i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        diagonal = np.asarray(self.diagonal())
        rows, cols, values = [index.ravel()], [index.ravel()], [diagonal.ravel()]
        for coef, di, dj in (
            (east, 0, 1),
            (west, 0, -1),
            (north, -1, 0),
            (south, 1, 0),
        ):
            inside = (0 <= i + di) & (i + di < n) & (0 <= j + dj) & (j + dj < n)
            rows.append(index[inside])
            cols.append(index[(i + di)[inside], (j + dj)[inside]])
            values.append(-coef[inside])
        return sp.csr_matrix(
            (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
            shape=(n * n, n * n),
        )

    def sweep(self, u, b, omega, backward=False):
        """One SOR sweep in red-black order (backward: black first)."""
        n = u.shape[0]
        i, j = jnp.meshgrid(jnp.arange(n), jnp.arange(n), indexing="ij")
        red = (i + j) % 2 == 0
        d = self.diagonal()
        for colour in (~red, red) if backward else (red, ~red):
            gauss_seidel = (b + self._neighbours(u)) / d
            u = jnp.where(colour, (1 - omega) * u + omega * gauss_seidel, u)
        return u


def smooth_field(n, width, rng):
    """An (n, n) NumPy field: white noise from `rng` smoothed by a width x width
    box filter, then standardised (mean 0, variance 1)."""
    g = rng.normal(size=(n + width, n + width))
    c = np.pad(np.cumsum(np.cumsum(g, 0), 1), ((1, 0), (1, 0)))
    w = width
    box = (c[w:, w:] - c[:-w, w:] - c[w:, :-w] + c[:-w, :-w])[:n, :n]
    return (box - box.mean()) / box.std()


def lognormal_coefficient(n, sigma=1.0, width=4, seed=0):
    """k = exp(σ g), g a `smooth_field`: the rough coefficient of a Darcy-flow
    problem, `Poisson2D(k)`; it spans about 4σ e-folds (σ = 0: Poisson)."""
    return np.exp(sigma * smooth_field(n, width, np.random.default_rng(seed)))
