"""Pillar 3: bilevel optimisation.

`argmin` is a differentiable minimiser; `hypergradient` computes ∇_θ of an outer
loss at the inner minimiser by implicit differentiation, unrolled, truncated or
forward-mode differentiation of an optimiser, or a first-order penalty method.
`SOBA`, `SABA`, `AmIGO`, `StocBiO` and `F2SA` are stochastic bilevel solvers
(`init` / `step`), and beyond strong convexity: `BOREP` (an upper level of
unbounded smoothness, with `normalized_momentum`), `VPBGD` (a lower level
with several minimisers, by a value-function penalty), `SLBAMM` (a merely
convex lower level, by averaging the two objectives) and `LVHBA` (a lower
level with constraints, by a proximal Lagrangian value function) and
`MultiBlock` (m lower-level problems sampled blockwise, variance-reduced);
`bloop` is Bloop's direction for the simple bilevel problem (an auxiliary loss
among a training loss's minimisers) as an optax transform.
"""

from ._argmin import argmin as argmin
from ._hypergradient import AbstractMethod as AbstractMethod
from ._hypergradient import Forward as Forward
from ._hypergradient import HyperGrad as HyperGrad
from ._hypergradient import Implicit as Implicit
from ._hypergradient import Penalty as Penalty
from ._hypergradient import Truncated as Truncated
from ._hypergradient import Unrolled as Unrolled
from ._hypergradient import hypergradient as hypergradient
from ._stochastic import Batches as Batches
from ._stochastic import BilevelState as BilevelState
from .amigo import AmIGO as AmIGO
from .bloop import BloopState as BloopState
from .bloop import bloop as bloop
from .borep import BOREP as BOREP
from .borep import normalized_momentum as normalized_momentum
from .f2sa import F2SA as F2SA
from .lvhba import LVHBA as LVHBA
from .lvhba import LVHBAState as LVHBAState
from .multiblock import MultiBlock as MultiBlock
from .multiblock import MultiBlockState as MultiBlockState
from .saba import SABA as SABA
from .slbamm import SLBAMM as SLBAMM
from .soba import SOBA as SOBA
from .stocbio import StocBiO as StocBiO
from .vpbgd import VPBGD as VPBGD
