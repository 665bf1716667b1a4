"""The one door to iterjax's private parts for code outside the numerical core:
the lab, the experiments and the benchmarks import what they need that is not
public API from here, never from a private module. What is here may change
without notice; a test keeps every other such import out.

* `optax_init`, `optax_step`: an optax optimiser's init and update on pytrees,
  as the bilevel solvers step θ.
* `ravel`: a pytree as one flat vector, with its inverse.
* `Sweeps`, `flat_cell`: the sweep core behind `iterjax.scan`, stepped one sweep
  at a time (error-vs-sweeps curves), and the flat carry update it iterates.
"""

from ._optax import optax_init as optax_init
from ._optax import optax_step as optax_step
from ._tree import ravel as ravel
from .sequence._core import Sweeps as Sweeps
from .sequence._scan import flat_cell as flat_cell
