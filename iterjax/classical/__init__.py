"""Classical iterations as fixed points: Sinkhorn (entropic optimal transport)
and Bradley-Terry (rankings from pairwise comparisons)."""

from .bradley_terry import bradley_terry as bradley_terry
from .bradley_terry import strongly_connected as strongly_connected
from .sinkhorn import Potentials as Potentials
from .sinkhorn import SparseNewton as SparseNewton
from .sinkhorn import marginal_error as marginal_error
from .sinkhorn import sinkhorn as sinkhorn
from .sinkhorn import transport_plan as transport_plan
