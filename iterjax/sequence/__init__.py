"""Pillar 1: sequential computation in parallel.

`scan` is a drop-in for `jax.lax.scan` that solves for every carry at once, by
sweeps of one core update (see `_core`) with a method choosing the matrix A_t:

| method | A_t | memory | converges |
|---|---|---|---|
| `Sequential()` | (plain `lax.scan`) | O(T D) | 1 pass, depth T |
| `Jacobi()` | 0 | O(T D) | linearly, at the cell's contraction rate |
| `GaussSeidel(block)` | (sequential in blocks) | O(T D) | block x faster than Jacobi |
| `Picard()` | I | O(T D) | increment recurrences (ODE / diffusion steps) |
| `QuasiDEER()` | diag ∂f/∂s | O(T D) | linearly, faster than Jacobi |
| `DEER()` | ∂f/∂s | O(T D^2) | quadratically near the solution |
| `ELK(damping)` | LM step (Kalman smoother) | O(T D^2) | where Newton overshoots |
| `QuasiELK(damping)` | LM step with diag ∂f/∂s | O(T D) | stably, linearly |

Every method also takes `window=W` (a ParaDiGMS sliding window: O(W) work and
memory per sweep) and `mesh=` (the time axis sharded over a device mesh).

`samplers` writes diffusion samplers (DDIM, PLMS, DPM-Solver++) as step maps
for `scan`; `staged` a recurrence whose state changes shape (coarse to fine).
"""

from . import samplers as samplers
from ._core import AbstractSequenceMethod as AbstractSequenceMethod
from ._scan import ScanStats as ScanStats
from ._scan import Sequential as Sequential
from ._scan import scan as scan
from .decode import DecodeStats as DecodeStats
from .decode import jacobi_decode as jacobi_decode
from .deer import DEER as DEER
from .deer import QuasiDEER as QuasiDEER
from .elk import ELK as ELK
from .elk import QuasiELK as QuasiELK
from .gauss_seidel import GaussSeidel as GaussSeidel
from .jacobi import Jacobi as Jacobi
from .picard import Picard as Picard
from .staged import Staged as Staged
from .staged import staged as staged
