"""iterjax: iterative computation as composable, pure JAX transformations."""

import importlib as _importlib
import importlib.metadata as _metadata

from . import bilevel as bilevel
from . import classical as classical
from . import diagnostics as diagnostics
from . import gallery as gallery
from . import linear as linear
from . import sequence as sequence
from . import tuning as tuning
from ._iterate import AbstractFixedPointSolver as AbstractFixedPointSolver
from ._iterate import iterative_solve as iterative_solve
from ._solution import NonConvergenceError as NonConvergenceError
from ._solution import Solution as Solution
from ._tree import max_norm as max_norm
from ._tree import rms_norm as rms_norm
from ._tree import two_norm as two_norm
from .bilevel import argmin as argmin
from .bilevel import hypergradient as hypergradient
from .fixed_point import NAGGS as NAGGS
from .fixed_point import Anderson as Anderson
from .fixed_point import AsyncCoordinates as AsyncCoordinates
from .fixed_point import Backtracking as Backtracking
from .fixed_point import Broyden as Broyden
from .fixed_point import Halpern as Halpern
from .fixed_point import LazyNewton as LazyNewton
from .fixed_point import Momentum as Momentum
from .fixed_point import Newton as Newton
from .fixed_point import OptaxSolver as OptaxSolver
from .fixed_point import Picard as Picard
from .fixed_point import Relaxed as Relaxed
from .fixed_point import Restarted as Restarted
from .fixed_point import RestartRule as RestartRule
from .fixed_point import Safeguarded as Safeguarded
from .fixed_point import Switched as Switched
from .fixed_point import VRHalpern as VRHalpern
from .fixed_point import finite_sum_fixed_point as finite_sum_fixed_point
from .fixed_point import fixed_point as fixed_point
from .fixed_point import fixed_point_chain as fixed_point_chain
from .fixed_point import nag_gs as nag_gs
from .fixed_point import root as root
from .implicit import AbstractAdjoint as AbstractAdjoint
from .implicit import ImplicitAdjoint as ImplicitAdjoint
from .implicit import PhantomAdjoint as PhantomAdjoint
from .implicit import UnrolledAdjoint as UnrolledAdjoint
from .linear import CG as CG
from .linear import GMRES as GMRES
from .linear import MFAC as MFAC
from .linear import BiCGStab as BiCGStab
from .linear import Neumann as Neumann
from .linear import Richardson as Richardson
from .sequence import DEER as DEER
from .sequence import ELK as ELK
from .sequence import DecodeStats as DecodeStats
from .sequence import GaussSeidel as GaussSeidel
from .sequence import Jacobi as Jacobi
from .sequence import QuasiDEER as QuasiDEER
from .sequence import QuasiELK as QuasiELK
from .sequence import ScanStats as ScanStats
from .sequence import Sequential as Sequential
from .sequence import jacobi_decode as jacobi_decode
from .sequence import scan as scan

__version__ = "0.1.0"

try:
    __version__ = _metadata.version("iterjax")
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


_LAZY = {  # imported on first use, with the extra that provides what they need
    "deq": ("flax", ("flax",)),
    "lab": ("lab", ("yaml", "rich", "matplotlib", "sklearn", "flax", "orbax")),
}


class _MissingExtra(ModuleNotFoundError):
    """An optional part of iterjax was used without the extra that installs its
    dependencies; the message says which `pip install 'iterjax[...]'`."""


def _import_part(name, module=None):
    """Import `module` (default `iterjax.<name>`) of the optional part `name` of
    `_LAZY`, or raise `_MissingExtra` naming the extra to install."""
    extra, needs = _LAZY[name]
    try:
        return _importlib.import_module(module or f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        missing = (e.name or "").split(".")[0]
        if missing not in needs:
            raise
        raise _MissingExtra(
            f"iterjax.{name} needs {missing}: pip install 'iterjax[{extra}]'",
            name=e.name,
        ) from e


def __getattr__(name):
    """`iterjax.deq` (the flax layers) and `iterjax.lab` (the experiment
    platform) are imported on first use: the rest of iterjax needs jax and optax
    only; flax is the `flax` extra, the platform's dependencies the `lab` one."""
    if name not in _LAZY:
        raise AttributeError(f"module 'iterjax' has no attribute {name!r}")
    return _import_part(name)
