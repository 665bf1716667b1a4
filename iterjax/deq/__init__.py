"""Pillar 2 for flax users: deep equilibrium layers.

`DEQ(cell)` is an NNX module whose output is the fixed point z* = cell(z*, x),
found by any iterjax solver and differentiated by any iterjax adjoint.
"""

from ._layer import DEQ as DEQ
