"""Fixed points and roots: `fixed_point`, `root` and their solvers."""

from ._api import finite_sum_fixed_point as finite_sum_fixed_point
from ._api import fixed_point as fixed_point
from ._api import root as root
from .anderson import Anderson as Anderson
from .async_coordinates import AsyncCoordinates as AsyncCoordinates
from .backtracking import Backtracking as Backtracking
from .broyden import Broyden as Broyden
from .chain import fixed_point_chain as fixed_point_chain
from .halpern import Halpern as Halpern
from .lazy_newton import LazyNewton as LazyNewton
from .momentum import Momentum as Momentum
from .nag_gs import NAGGS as NAGGS
from .nag_gs import nag_gs as nag_gs
from .newton import Newton as Newton
from .optax_solver import OptaxSolver as OptaxSolver
from .picard import Picard as Picard
from .relaxed import Relaxed as Relaxed
from .restarted import Restarted as Restarted
from .restarted import RestartRule as RestartRule
from .safeguarded import Safeguarded as Safeguarded
from .switched import Switched as Switched
from .vr_halpern import VRHalpern as VRHalpern
