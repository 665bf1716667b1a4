"""iterjax.lab: the experiment platform (configs, runs, sweeps, reports).

The numerical core (`iterjax.fixed_point`, `linear`, `sequence`, `bilevel`, `deq`)
never imports this package; the platform imports the core.
"""

from .registry import register as register
from .runner import run as run
