"""Bloop (Hsieh, Thornton, Ndiaye, Klein, Cuturi & Ablin, "Careful with that
Scalpel: Improving Gradient Surgery with an EMA", 2024) as an optax
`GradientTransformation`.

The simple bilevel problem min L_aux(x) over x ∈ argmin L_main: step along

    d = g_main + λ π(g_aux; m),   π(a; m) = a - (⟨a, m⟩ / ‖m‖²) m,
    m ← ρ m + (1 - ρ) g_main      (updated before the projection),

the training gradient plus the auxiliary gradient's part orthogonal to an
exponential moving average m of training gradients: to first order a step
along d changes L_main as g_main alone would, in expectation over mini-batches
(m, not one noisy batch gradient, is what the paper shows must be orthogonal).
π is invariant to the scale of m, so m needs no bias correction; ρ = 0 is the
deterministic method (projection on the current g_main); π(a; 0) = a.
"""

from typing import NamedTuple

import jax.numpy as jnp
import optax

from .. import _tree as tu
from .._checks import check_range


class BloopState(NamedTuple):
    ema: optax.Updates  # m, the moving average of training gradients


def project_out(a, m):
    """π(a; m) = a - (⟨a, m⟩ / ‖m‖²) m, for pytrees (a itself where m = 0)."""
    mm = tu.tree_vdot(m, m)
    coef = jnp.where(mm > 0, tu.tree_vdot(a, m) / jnp.where(mm > 0, mm, 1), 0)
    return tu.tree_axpy(-coef, m, a)


def bloop(aux_weight: float, decay: float = 0.9) -> optax.GradientTransformation:
    """Bloop's direction from the pair `(g_main, g_aux)`.

    Its `update` takes `updates = (g_main, g_aux)`, two gradients shaped like the
    parameters, and returns d (shaped like them) for the transformations chained
    after it: `optax.chain(bloop(0.1), optax.sgd(1e-2))` descends along -d.

    Args:
      aux_weight: λ >= 0, the auxiliary gradient's weight (0: training alone).
      decay: ρ in [0, 1), the EMA's decay (0: the deterministic projection).
    """
    check_range("bloop", "aux_weight", aux_weight, lo=0.0)
    check_range("bloop", "decay", decay, 0.0, 1.0, hi_open=True)

    def init(params):
        return BloopState(tu.tree_zeros_like(params))

    def update(updates, state, params=None):
        del params
        if not (isinstance(updates, tuple) and len(updates) == 2):
            raise TypeError(
                "bloop: `updates` must be the pair (g_main, g_aux) of gradients, "
                f"got {type(updates).__name__}"
            )
        g_main, g_aux = updates
        for name, tree in (("g_main", g_main), ("g_aux", g_aux)):
            if tu.tree_structs(tree) != tu.tree_structs(state.ema):
                raise ValueError(
                    f"bloop: `{name}` must have the parameters' structure, shapes "
                    f"and dtypes, got {tu.tree_structs(tree)}"
                )
        ema = tu.tree_lerp(1 - decay, state.ema, g_main)
        d = tu.tree_axpy(aux_weight, project_out(g_aux, ema), g_main)
        return d, BloopState(ema)

    return optax.GradientTransformation(init, update)
