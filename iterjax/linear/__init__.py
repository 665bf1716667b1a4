"""Linear solvers used by Newton and by the implicit adjoint: A as a function,
a dense or a BCOO matrix."""

from ._base import AbstractLinearSolver as AbstractLinearSolver
from ._base import LinearStats as LinearStats
from ._base import as_matvec as as_matvec
from ._base import from_scipy as from_scipy
from .chebyshev import Chebyshev as Chebyshev
from .gcrodr import GCRODR as GCRODR
from .krylov import CG as CG
from .krylov import GMRES as GMRES
from .krylov import BiCGStab as BiCGStab
from .multigrid import Multigrid as Multigrid
from .multigrid import MultigridSolver as MultigridSolver
from .multigrid import Stencil9 as Stencil9
from .neumann import Neumann as Neumann
from .neumann import Richardson as Richardson
from .preconditioners import AbstractPreconditioner as AbstractPreconditioner
from .preconditioners import ChebyshevPreconditioner as ChebyshevPreconditioner
from .preconditioners import FunctionPreconditioner as FunctionPreconditioner
from .preconditioners import JacobiPreconditioner as JacobiPreconditioner
from .recycle import RecycledCG as RecycledCG
from .recycle import RecycleState as RecycleState
from .recycle import similarity_order as similarity_order
from .recycle import solve_sequence as solve_sequence
from .stationary import SOR as SOR
from .stationary import MatrixOperator as MatrixOperator
from .stationary import optimal_omega as optimal_omega
