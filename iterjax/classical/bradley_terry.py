"""Bradley-Terry scores from pairwise comparisons, as a fixed point."""

import jax
import jax.numpy as jnp
import numpy as np

from .._iterate import AbstractFixedPointSolver
from .._solution import Solution
from .._types import ArrayLike, Float
from ..fixed_point import Anderson, fixed_point

ITERATIONS = ("newman", "zermelo")


def bradley_terry(
    wins: Float[ArrayLike, "n n"],
    s0: Float[ArrayLike, " n"] | None = None,
    *,
    iteration: str = "newman",
    solver: AbstractFixedPointSolver = Anderson(),
    **options,
) -> Solution:
    """Maximum-likelihood Bradley-Terry scores.

    Player i beats j with probability π_i / (π_i + π_j) = σ(s_i - s_j), with
    s = log π. Given `wins[i, j]`, the number of times i beat j, the maximum
    likelihood scores solve W_i = Σ_j n_ij σ(s_i - s_j), where W_i = Σ_j w_ij
    and n_ij = w_ij + w_ji. Two iterations have them as fixed point:

    * "zermelo" (Zermelo 1929; Hunter's MM algorithm):
          π_i ← W_i / Σ_j n_ij / (π_i + π_j)
    * "newman" (Newman 2023, "Efficient computation of rankings from pairwise
      comparisons", JMLR; eq. 12), often orders of magnitude fewer steps:
          π_i ← [Σ_j w_ij π_j / (π_i + π_j)] / [Σ_j w_ji / (π_i + π_j)]

    iterjax iterates them on s, with sigmoids in place of the ratios (no
    overflow for widely spread scores), and removes the mean of s after each
    step: the scores are defined up to a common factor of π. Any `fixed_point`
    solver applies: `Picard()` is the iteration itself, `Anderson()` (the
    default) accelerates it, 2-9x fewer steps on `bradley_terry`'s graphs.
    Newman's update, applied to all players at once as here, has an eigenvalue
    -1 on a bipartite comparison graph (two players: the ratio π_0/π_1 maps to
    its reflection about the answer) and Picard then cycles; Anderson, or
    `Relaxed(Picard(), 0.5)`, converges there. (Newman's own code updates the
    players one after another, which avoids the cycle but is sequential.)
    Gradients with respect to `wins` go through the fixed-point adjoint.

    The maximum likelihood scores exist and are unique exactly when every
    partition of the players into two groups has a player of each group beating
    one of the other: the directed graph "i beat j" is strongly connected (Ford
    1957). This is checked when `wins` is concrete (not under `jit`).

    Args:
      wins: (n, n) array of float counts (or weights) >= 0, zero diagonal.
      s0: initial log-scores, shape (n,); zeros by default.
      iteration: "newman" (default) or "zermelo".
      solver: a `fixed_point` solver (default `Anderson()`).
      **options: `fixed_point`'s options (atol, rtol, max_steps, adjoint, throw,
        trace, norm).

    Returns:
      `fixed_point`'s `Solution`; its value is the log-scores s, with mean zero
      (choix's normalisation).

    Example:
      >>> import jax.numpy as jnp
      >>> from iterjax.classical import bradley_terry
      >>> wins = jnp.array([[0.0, 3.0, 3.0], [1.0, 0.0, 2.0], [1.0, 2.0, 0.0]])
      >>> sol = bradley_terry(wins, atol=1e-6)  # log-scores, mean 0
      >>> bool(sol.converged), bool(sol.value[0] > sol.value[1])
      (True, True)
    """
    wins = jnp.asarray(wins)
    _check(wins, iteration)
    if s0 is None:
        s0 = jnp.zeros(wins.shape[0], wins.dtype)
    step = _newman if iteration == "newman" else _zermelo
    return fixed_point(step, s0, wins, solver=solver, **options)


def _log_weighted_sum(w, x):
    """log Σ_j w_ij σ(x_ij), row by row."""
    return jax.nn.logsumexp(jax.nn.log_sigmoid(x), b=w, axis=1)


def _centred(s):
    return s - jnp.mean(s)


def _newman(s, wins):
    d = s[:, None] - s[None, :]  # s_i - s_j
    return _centred(s + _log_weighted_sum(wins, -d) - _log_weighted_sum(wins.T, d))


def _zermelo(s, wins):
    d = s[:, None] - s[None, :]
    log_total_wins = jnp.log(jnp.sum(wins, axis=1))
    return _centred(s + log_total_wins - _log_weighted_sum(wins + wins.T, d))


def _check(wins, iteration):
    if iteration not in ITERATIONS:
        raise ValueError(
            f"bradley_terry: `iteration` must be one of {ITERATIONS}, got {iteration!r}"
        )
    if wins.ndim != 2 or wins.shape[0] != wins.shape[1]:
        raise ValueError(
            f"bradley_terry: `wins` must be a square matrix, got shape {wins.shape}"
        )
    if not jnp.issubdtype(wins.dtype, jnp.floating):
        raise TypeError(
            f"bradley_terry: `wins` must be a float array, got {wins.dtype}"
        )
    if isinstance(wins, jax.core.Tracer):
        return  # traced: the checks below need values
    w = np.asarray(wins)
    if not np.all(np.isfinite(w)) or np.any(w < 0):
        raise ValueError("bradley_terry: `wins` must be finite and >= 0")
    if np.any(np.diag(w) != 0):
        raise ValueError("bradley_terry: `wins` must have a zero diagonal")
    for graph, who in ((w > 0, "beat"), (w.T > 0, "lost to")):
        unreached = _unreached(graph)
        if unreached.size:
            raise ValueError(
                "bradley_terry: the comparison graph is not strongly connected, "
                "so the maximum-likelihood scores do not exist or are not "
                f"unique: player 0 never (directly or by a chain) {who} players "
                f"{unreached[:10].tolist()}"
                f"{' ...' if unreached.size > 10 else ''}. Add a prior, e.g. "
                "`wins + c * (1 - eye(n))` for a small c > 0."
            )


def strongly_connected(wins) -> bool:
    """Whether the directed graph "i beat j" (`wins[i, j] > 0`) is strongly
    connected: the condition for unique maximum-likelihood scores (concrete
    `wins` only).

    Example:
      >>> import numpy as np, iterjax
      >>> from iterjax.classical import strongly_connected
      >>> cycle = np.array([[0, 1, 0], [0, 0, 1], [1, 0, 0]])  # 0 > 1 > 2 > 0
      >>> chain = np.array([[0, 1, 0], [0, 0, 1], [0, 0, 0]])  # 2 never wins
      >>> strongly_connected(cycle), strongly_connected(chain)
      (True, False)"""
    w = np.asarray(wins)
    return not (_unreached(w > 0).size or _unreached(w.T > 0).size)


def _unreached(adjacency):
    """The nodes not reachable from node 0 along `adjacency` (breadth-first)."""
    seen = np.zeros(len(adjacency), bool)
    seen[0] = True
    frontier = seen.copy()
    while frontier.any():
        frontier = adjacency[frontier].any(axis=0) & ~seen
        seen |= frontier
    return np.flatnonzero(~seen)
