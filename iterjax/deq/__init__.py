"""Pillar 2 for flax users: deep equilibrium layers.

`DEQ(cell)` is an NNX module whose output is the fixed point z* = cell(z*, x),
found by any iterjax solver and differentiated by any iterjax adjoint.
`ContractiveDense` and `SubhomogeneousDense` are cells whose fixed point exists
by construction (`subhomogeneity` checks the latter's condition on any cell), and
`ConvergentGraphSolver` a graph layer built on one (Convergent Graph Solvers);
`jacobian_penalty` and `fixed_point_correction` stabilise training.
`iterjax.deq.linen.DEQ` is the same layer for flax.linen models.
"""

from . import linen as linen
from ._cells import ContractiveDense as ContractiveDense
from ._cells import SubhomogeneousDense as SubhomogeneousDense
from ._cells import subhomogeneity as subhomogeneity
from ._graph import ConvergentGraphSolver as ConvergentGraphSolver
from ._graph import GraphPropagation as GraphPropagation
from ._graph import graph_transition as graph_transition
from ._layer import DEQ as DEQ
from ._stabilize import fixed_point_correction as fixed_point_correction
from ._stabilize import jacobian_penalty as jacobian_penalty
