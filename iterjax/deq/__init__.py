"""Pillar 2 for flax users: deep equilibrium layers.

`DEQ(cell)` is an NNX module whose output is the fixed point z* = cell(z*, x),
found by any iterjax solver and differentiated by any iterjax adjoint.
`ContractiveDense` is a cell whose fixed point exists by construction, and
`ConvergentGraphSolver` a graph layer built on one (Convergent Graph Solvers);
`jacobian_penalty` and `fixed_point_correction` stabilise training.
`iterjax.deq.linen.DEQ` is the same layer for flax.linen models.
"""

from . import linen as linen
from ._cells import ContractiveDense as ContractiveDense
from ._graph import ConvergentGraphSolver as ConvergentGraphSolver
from ._graph import GraphPropagation as GraphPropagation
from ._graph import graph_transition as graph_transition
from ._layer import DEQ as DEQ
from ._stabilize import fixed_point_correction as fixed_point_correction
from ._stabilize import jacobian_penalty as jacobian_penalty
