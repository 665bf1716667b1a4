"""Learning a solver's parameters from its cost, across a sequence of problems.

`Exp3` (a plain bandit) and `SquareCB` (a contextual one) pick a parameter (SOR's
ω) per system from a grid of arms; `bandit.run` runs one over a sequence of
systems in a `lax.scan` (Khodak et al. 2024, "Learning to Relax").
`refined_schedule` builds a learning-rate schedule from the gradient norms of an
earlier run (Defazio et al. 2023). `OptEx` runs N optimiser steps in the
sequential time of one, from gradients a kernel model predicts (Shu et al. 2024).
"""

from . import bandit as bandit
from . import schedules as schedules
from .bandit import BanditState as BanditState
from .bandit import Exp3 as Exp3
from .bandit import SquareCB as SquareCB
from .optex import OptEx as OptEx
from .optex import OptExState as OptExState
from .schedules import refined_schedule as refined_schedule
from .schedules import refined_weights as refined_weights
