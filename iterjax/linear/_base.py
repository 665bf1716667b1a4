"""Matrix-free linear solvers: `solver.solve(matvec, b) -> x` with `matvec(x) = A x`.

`matvec` is a linear function on pytrees (never a materialised matrix); `b` is a
pytree like its input. Every solver can be used as the `solve` and `transpose_solve`
of `jax.lax.custom_linear_solve`, which is how the implicit adjoint uses them.
"""

import abc

from flax import struct


class AbstractLinearSolver(struct.PyTreeNode):
    """Base class: hyperparameters are static fields (hashable, never traced)."""

    @abc.abstractmethod
    def solve(self, matvec, b):
        """Approximately solve `matvec(x) = b` for `x`."""
