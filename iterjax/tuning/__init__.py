"""Learning a solver's parameters from its cost, across a sequence of problems.

`Exp3` (a plain bandit) and `SquareCB` (a contextual one) pick a parameter (SOR's
ω) per system from a grid of arms; `bandit.run` runs one over a sequence of
systems in a `lax.scan` (Khodak et al. 2024, "Learning to Relax").
"""

from . import bandit as bandit
from .bandit import BanditState as BanditState
from .bandit import Exp3 as Exp3
from .bandit import SquareCB as SquareCB
