"""`iterjax.deq.linen.DEQ`: the DEQ layer for flax.linen users.

The NNX `iterjax.deq.DEQ` is the primary API; this wrapper gives linen models the
same layer. The cell's parameters are read from the module's scope and passed to
`iterjax.fixed_point` as arguments, so every solver and adjoint applies and
`jax.grad` of `model.apply` reaches them through the adjoint.
"""

from typing import Any

import flax.linen as nn
from flax.errors import FlaxError

from .._checks import user_call
from .._tree import max_norm
from ..fixed_point import Anderson
from ..fixed_point import fixed_point as _fixed_point
from ..implicit import ImplicitAdjoint
from ._layer import check_cell


class DEQ(nn.Module):
    """Deep equilibrium layer for linen: z* = cell(z*, x).

    Attributes:
      cell: a linen module, `cell(z, x) -> z`, with parameters only (no mutable
        collections such as batch statistics: a fixed point has no "last step" to
        update them from).
      solver, adjoint, atol, rtol, max_steps, throw, norm: as for
        `iterjax.fixed_point`.

    Call `deq(x, z0)`; `return_solution=True` also returns the `Solution`.

    Examples:
      >>> import jax, jax.numpy as jnp, flax.linen as nn, iterjax
      >>> class Cell(nn.Module):
      ...     @nn.compact
      ...     def __call__(self, z, x):
      ...         return jnp.tanh(0.5 * nn.Dense(4, use_bias=False)(z) + x)
      >>> layer = iterjax.deq.linen.DEQ(Cell(), atol=1e-5)
      >>> x, z0 = jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32)
      >>> params = layer.init(jax.random.key(0), x, z0)
      >>> z = layer.apply(params, x, z0)
      >>> cell = lambda z: Cell().apply({"params": params["params"]["cell"]}, z, x)
      >>> bool(jnp.max(jnp.abs(cell(z) - z)) < 1e-5)
      True
    """

    cell: nn.Module
    solver: Any = Anderson()
    adjoint: Any = ImplicitAdjoint()
    atol: float = 1e-6
    rtol: float = 0.0
    max_steps: int = 100
    throw: bool = False
    norm: Any = max_norm

    @nn.compact
    def __call__(self, x, z0, *, return_solution: bool = False):
        if self.is_initializing():  # creates the cell's parameters
            owner = f"DEQ({type(self.cell).__name__})"
            with user_call(owner, "the cell", dict(z0=z0, x=x), (FlaxError,)):
                self.cell(z0, x)
        variables = self.cell.variables
        cell = self.cell.clone(parent=None)

        def fn(z, args):
            variables, x = args
            return cell.apply(variables, z, x)

        check_cell(type(self.cell).__name__, fn, z0, (variables, x), x)
        sol = _fixed_point(
            fn,
            z0,
            (variables, x),
            solver=self.solver,
            adjoint=self.adjoint,
            atol=self.atol,
            rtol=self.rtol,
            max_steps=self.max_steps,
            throw=self.throw,
            norm=self.norm,
        )
        return (sol.value, sol) if return_solution else sol.value
