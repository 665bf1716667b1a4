"""Model problems with known structure, shared by tests, benchmarks and
experiments (as in pyamg's and scipy's galleries): operators that expose what
the solvers built for them need (SOR's splitting, a smoother's sweep)."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.sparse as sp

from . import _struct as struct


def _shifted(padded, axis, offset):
    """The interior of a grid padded by one on every side, moved by `offset`
    along `axis`: the neighbours on that side of every interior node."""
    index = [slice(1, n - 1) for n in padded.shape]
    index[axis] = slice(1 + offset, padded.shape[axis] - 1 + offset)
    return padded[tuple(index)]


class _GridPoisson(struct.PyTreeNode):
    """-∇·(k∇u) + c u on a grid of side n in each of `ndim` dimensions, with zero
    boundary values (2 ndim + 1 points, spacing h = 1 / (n + 1), k given at the
    nodes and averaged onto the edges), matrix-free, on arrays of k's shape.
    k = 1, c = 0 is the model Poisson problem; c > 0 (a screened Poisson /
    implicit heat step) strengthens the diagonal, so Jacobi's spectral radius
    ρ_J and the best SOR ω shrink.

    Attributes:
      k: positive coefficients, of shape (n,) * ndim.
      shift: c >= 0 (a scalar, which may be traced).
    """

    k: jax.Array
    shift: float = 0.0

    ndim = 0  # the subclass's dimension
    points = property(lambda self: 2 * self.ndim + 1)  # stencil points per node
    sweep_products = 2  # a red-black sweep evaluates the neighbours twice

    def __post_init__(self):
        # (leading axes are a batch: an operator of stacked k vmaps as a pytree)
        shape = getattr(self.k, "shape", None)
        if shape is not None and (
            len(shape) < self.ndim or len(set(shape[len(shape) - self.ndim :])) != 1
        ):
            raise ValueError(
                f"{type(self).__name__}: `k` must be a grid of side n in each of "
                f"{self.ndim} dimensions (after any batch axes), got shape "
                f"{tuple(shape)}"
            )

    def _edges(self):
        """(axis, offset, coefficient) of each neighbour: the last axis first
        (its + side, then its - side), then the others' - and + sides (in 2-D:
        east, west, north, south, the order sums over them have always taken)."""
        h2 = 1.0 / (self.k.shape[0] + 1) ** 2
        kp = jnp.pad(self.k, 1, mode="edge")
        centre = _shifted(kp, 0, 0)
        edges = []
        for axis in reversed(range(self.ndim)):
            for offset in (1, -1) if axis == self.ndim - 1 else (-1, 1):
                edges.append(
                    (axis, offset, 0.5 * (centre + _shifted(kp, axis, offset)) / h2)
                )
        return edges

    def _neighbours(self, u):
        up = jnp.pad(u, 1)
        total = 0.0
        for axis, offset, coef in self._edges():
            total = total + coef * _shifted(up, axis, offset)
        return total

    def __call__(self, u):
        return self.diagonal() * u - self._neighbours(u)

    def diagonal(self):
        return sum(coef for _, _, coef in self._edges()) + self.shift

    def coarsen(self):
        """The same problem on the grid of spacing 2h (n = 2m + 1 -> m points,
        the coarse nodes being the fine ones of odd index), k sampled there:
        the rediscretised operator geometric multigrid uses."""
        n = self.k.shape[0]
        if n % 2 == 0 or n < 3:
            name = type(self).__name__
            raise ValueError(f"{name}.coarsen: needs an odd n >= 3, got n = {n}")
        return type(self)(self.k[(slice(1, None, 2),) * self.ndim], self.shift)

    def assemble(self):
        """The operator as a scipy.sparse CSR matrix on the row-major unknowns
        (k and the shift must be concrete, not traced): what algebraic
        multigrid and the peers of `benchmarks/linear.py` take."""
        shape = self.k.shape
        index = np.arange(np.prod(shape)).reshape(shape)
        where = np.indices(shape)
        diagonal = np.asarray(self.diagonal())
        rows, cols, values = [index.ravel()], [index.ravel()], [diagonal.ravel()]
        for axis, offset, coef in self._edges():
            moved = where.copy()
            moved[axis] += offset
            inside = (0 <= moved[axis]) & (moved[axis] < shape[axis])
            rows.append(index[inside])
            cols.append(index[tuple(m[inside] for m in moved)])
            values.append(-np.asarray(coef)[inside])
        size = index.size
        return sp.csr_matrix(
            (np.concatenate(values), (np.concatenate(rows), np.concatenate(cols))),
            shape=(size, size),
        )

    def sweep(self, u, b, omega, backward=False):
        """One SOR sweep in red-black order (the parity of the index sum; nodes
        of one colour do not touch; backward: black first)."""
        red = sum(jnp.indices(u.shape)) % 2 == 0
        d = self.diagonal()
        for colour in (~red, red) if backward else (red, ~red):
            gauss_seidel = (b + self._neighbours(u)) / d
            u = jnp.where(colour, (1 - omega) * u + omega * gauss_seidel, u)
        return u


class Poisson2D(_GridPoisson):
    """-∇·(k∇u) + c u on an n x n interior grid with zero boundary values (5
    points, spacing h = 1 / (n + 1), k given at the nodes and averaged onto the
    edges), matrix-free, on arrays of shape (n, n). k = 1, c = 0 is the model
    Poisson problem; c > 0 (a screened Poisson / implicit heat step) strengthens
    the diagonal, so Jacobi's spectral radius ρ_J and the best SOR ω shrink.

    Attributes:
      k: (n, n) positive coefficients.
      shift: c >= 0 (a scalar, which may be traced).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A = iterjax.gallery.Poisson2D(jnp.ones((3, 3)))
      >>> A(jnp.ones((3, 3))).shape, A.assemble().shape  # matrix-free, or scipy CSR
      ((3, 3), (9, 9))
    """

    ndim = 2


class Poisson3D(_GridPoisson):
    """-∇·(k∇u) + c u on an n x n x n interior grid with zero boundary values
    (7 points, spacing h = 1 / (n + 1)), matrix-free, on arrays of shape
    (n, n, n): `Poisson2D`'s operator one dimension up, with the same methods
    (red-black sweeps, `coarsen()` for geometric multigrid, `assemble()`).

    Attributes:
      k: (n, n, n) positive coefficients.
      shift: c >= 0 (a scalar, which may be traced).

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> A = iterjax.gallery.Poisson3D(jnp.ones((3, 3, 3)))
      >>> A(jnp.ones((3, 3, 3))).shape, A.assemble().shape
      ((3, 3, 3), (27, 27))
    """

    ndim = 3


def smooth_field(n, width, rng, ndim=2):
    """An (n,) * ndim NumPy field: white noise from `rng` smoothed by a box filter
    of side `width`, then standardised (mean 0, variance 1).

    Example:
      >>> import numpy as np, iterjax
      >>> g = iterjax.gallery.smooth_field(16, 4, np.random.default_rng(0))
      >>> g.shape, round(float(g.mean()), 6), round(float(g.std()), 6)
      ((16, 16), 0.0, 1.0)
    """
    g = rng.normal(size=(n + width,) * ndim)
    c = g
    for axis in range(ndim):
        c = np.cumsum(c, axis)
    c = np.pad(c, ((1, 0),) * ndim)
    w = width
    box = 0.0  # inclusion-exclusion over the box's corners
    for bits in itertools.product((1, 0), repeat=ndim):
        corner = tuple(slice(w, None) if b else slice(None, -w) for b in bits[::-1])
        sign = (-1) ** (ndim - sum(bits))
        box = box + sign * c[corner]
    box = box[(slice(None, n),) * ndim]
    return (box - box.mean()) / box.std()


def lognormal_coefficient(n, sigma=1.0, width=4, seed=0, ndim=2):
    """k = exp(σ g), g a `smooth_field`: the rough coefficient of a Darcy-flow
    problem, `Poisson2D(k)` (`Poisson3D(k)` with ndim=3); it spans about 4σ
    e-folds (σ = 0: Poisson).

    Example:
      >>> import iterjax
      >>> k = iterjax.gallery.lognormal_coefficient(15, sigma=1.0)
      >>> k.shape, bool((k > 0).all())
      ((15, 15), True)
    """
    rng = np.random.default_rng(seed)
    return np.exp(sigma * smooth_field(n, width, rng, ndim))
