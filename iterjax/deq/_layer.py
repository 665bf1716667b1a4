"""`DEQ`: a flax NNX layer whose output is a fixed point of its cell."""

from flax import nnx
from flax.errors import FlaxError

from .. import _tree as tu
from .._checks import check_same_structure, eval_shape
from .._iterate import AbstractFixedPointSolver
from .._solution import Solution
from .._tree import max_norm
from ..fixed_point import Anderson
from ..fixed_point import fixed_point as _fixed_point
from ..implicit import AbstractAdjoint, ImplicitAdjoint
from ._stabilize import fixed_point_correction, jacobian_penalty


def check_cell(name, fn, z0, args, x):
    """The layer's call: the cell must accept (z0, x) and return z0's structure,
    shapes and dtypes; errors (flax's own too) name the layer and the shapes of x
    and z0."""
    owner = f"DEQ({name})"
    call = lambda z0, x: fn(z0, args)
    out = eval_shape(
        owner, "the cell", call, z0, x, names=("z0", "x"), errors=(FlaxError,)
    )
    check_same_structure(owner, "the cell(z, x)", out, tu.tree_structs(z0), "z0")


class DEQ(nnx.Module):
    """Deep equilibrium layer (Bai et al. 2019): z* = cell(z*, x).

    The cell's parameters and `x` are the arguments of `iterjax.fixed_point`, so
    the adjoint decides how gradients reach them: `ImplicitAdjoint` (default;
    memory independent of the number of solver steps), `UnrolledAdjoint`, or
    `PhantomAdjoint` (steps=1: Jacobian-free backprop). Works under `nnx.jit`,
    `nnx.vmap`, `nnx.grad` and inside `lax.scan`.

    Args:
      cell: a callable NNX module, `cell(z, x) -> z`, z a pytree whose structure,
        shapes and dtypes the cell keeps.
      solver, adjoint, atol, rtol, max_steps, throw, norm: as for
        `iterjax.fixed_point`.

    Call `deq(x, z0)` with the initial guess z0 (zeros, or the previous solution
    for a warm start, as in FPDM and real-time iteration); `return_solution=True`
    also returns the `Solution` (steps, residual, converged) of that call.
    `deq.jacobian_penalty(x, z, key)` and `deq.fixed_point_correction(x, z)` apply
    the stabilisers of the same names to the cell at input x.

    Examples:
      >>> import jax, jax.numpy as jnp, iterjax
      >>> from flax import nnx
      >>> class Cell(nnx.Module):
      ...     def __init__(self, rngs):
      ...         self.w = nnx.Linear(4, 4, rngs=rngs)
      ...     def __call__(self, z, x):
      ...         return jnp.tanh(0.5 * self.w(z) + x)
      >>> deq = iterjax.deq.DEQ(Cell(nnx.Rngs(0)), atol=1e-5)
      >>> x, z0 = jnp.ones(4, jnp.float32), jnp.zeros(4, jnp.float32)
      >>> z, sol = deq(x, z0, return_solution=True)
      >>> bool(sol.converged), z.shape
      (True, (4,))
    """

    def __init__(
        self,
        cell,
        *,
        solver: AbstractFixedPointSolver = Anderson(),
        adjoint: AbstractAdjoint = ImplicitAdjoint(),
        atol: float = 1e-6,
        rtol: float = 0.0,
        max_steps: int = 100,
        throw: bool = False,
        norm=max_norm,
    ):
        if not (isinstance(cell, nnx.Module) and callable(cell)):
            raise TypeError(
                "DEQ: `cell` must be a callable nnx.Module, cell(z, x) -> z, got "
                f"{type(cell).__name__}"
            )
        self.cell = cell
        self.options = nnx.static(
            dict(
                solver=solver,
                adjoint=adjoint,
                atol=atol,
                rtol=rtol,
                max_steps=max_steps,
                throw=throw,
                norm=norm,
            )
        )

    def __call__(self, x, z0, *, return_solution: bool = False):
        graphdef, state = nnx.split(self.cell)

        def fn(z, args):
            state, x = args
            return nnx.merge(graphdef, state)(z, x)

        check_cell(type(self.cell).__name__, fn, z0, (state, x), x)
        sol: Solution = _fixed_point(fn, z0, (state, x), **self.options)
        return (sol.value, sol) if return_solution else sol.value

    def jacobian_penalty(self, x, z, key, *, num_samples: int = 1):
        """`iterjax.deq.jacobian_penalty` of the cell at input x and point z."""
        return jacobian_penalty(
            lambda z: self.cell(z, x), z, key, num_samples=num_samples
        )

    def fixed_point_correction(self, x, z, *, steps: int = 3, damping: float = 1.0):
        """`iterjax.deq.fixed_point_correction` of the cell at input x from z."""
        cell = lambda z: self.cell(z, x)
        return fixed_point_correction(cell, z, steps=steps, damping=damping)
