"""Halpern (anchored) iteration with adaptive restarts."""

from typing import NamedTuple

import jax.numpy as jnp

from .. import _tree as tu
from .._checks import check_range
from .._iterate import AbstractFixedPointSolver
from .._types import Array, Float, Int, Y
from .restarted import RestartRule


class HalpernState(NamedTuple):
    residual: Y  # fn(y, args) - y
    anchor: Y  # the anchor of the current epoch
    gamma: Float[Array, ""]  # contraction factor in use (given or estimated)
    anchor_norm: Float[Array, ""]  # |fn(y) - y| at the anchor
    last_norm: Float[Array, ""]  # |fn(y) - y| one step earlier
    epoch: Int[Array, ""]  # steps since the last restart
    steps: Int[Array, ""]  # steps in total
    restarts: Int[Array, ""]


class Halpern(AbstractFixedPointSolver):
    """Halpern iteration anchored at y_0, with adaptive restarts and reflection.

    With T_ρ = (1 + ρ) f - ρ I (ρ = `reflection`; T_0 = f) and an anchor y_a::

        y_{k+1} = β_k y_a + (1 - β_k) T_ρ(y_k),   β_k = 1 / φ_{k+1},
        φ_k = Σ_{i=0}^{k} γ^{-2i}

    For γ = 1, φ_k = k + 1 and β_k = 1/(k+2): the classical Halpern iteration,
    which on a nonexpansive f converges to the fixed point nearest the anchor with
    the optimal last-iterate rate |y_k - f(y_k)| = O(1/k) (Lieder 2021), where
    Picard iteration may cycle. For a γ-contraction, these are the anchor weights
    of OC-Halpern (Park & Ryu 2022, "Exact optimal accelerated complexity for
    fixed-point iterations"), whose residual falls like γ^k: exactly optimal, and
    never slower than Picard by more than a constant. `contraction=None` (the
    default) estimates γ online as the largest secant ratio seen so far,
    |T_ρ y_{k+1} - T_ρ y_k| / |y_{k+1} - y_k|, capped at 1, so that a map that
    is only nonexpansive runs the classical weights; `contraction=1.0` fixes them.

    Restarts (`RestartRule`: Lu & Yang 2024, "Restarted Halpern PDHG for linear
    programming", the rules of cuPDLP-x) move the anchor to the current iterate
    and k to 0 when the residual |f(y_k) - y_k| has fallen enough since the last
    anchor, or fell and stalled, or the epoch has lasted long enough. They turn the
    sublinear rate into a linear one on problems with a sharp fixed point
    (contractions among them, and rotations). One f evaluation per step.

    Attributes:
      reflection: ρ in [0, 1]; ρ = 1 anchors the reflected map 2f - I, which is
        nonexpansive when f is firmly nonexpansive (a resolvent, a projection).
      contraction: γ in (0, 1], or None to estimate it.
      restart: a `RestartRule`, or None for one epoch anchored at y_0 (with
        `contraction=1.0`, the textbook iteration).

    Examples:
      >>> import jax.numpy as jnp, iterjax
      >>> sol = iterjax.fixed_point(lambda y, a: jnp.cos(y), jnp.array(1.0),
      ...                           solver=iterjax.Halpern(), atol=1e-10)
      >>> round(float(sol.value), 6), bool(sol.converged)
      (0.739085, True)
    """

    reflection: float = 0.0
    contraction: float | None = None
    restart: RestartRule | None = RestartRule()

    def __post_init__(self):
        check_range("Halpern", "reflection", self.reflection, 0.0, 1.0)
        if self.contraction is not None:
            check_range("Halpern", "contraction", self.contraction, 0.0, 1.0, True)

    def init(self, fn, y0, args):
        residual = tu.tree_sub(fn(y0, args), y0)
        norm = tu.two_norm(residual)
        zero = jnp.int32(0)
        gamma = jnp.zeros_like(norm)  # estimated from the first step on
        if self.contraction is not None:
            gamma = jnp.asarray(self.contraction, norm.dtype)
        return HalpernState(residual, y0, gamma, norm, norm, zero, zero, zero)

    def step(self, fn, y, args, state):
        norm = tu.two_norm(state.residual)
        anchor, anchor_norm, count, restarts = _restart(self, y, norm, state)
        t_y = tu.tree_axpy(1.0 + self.reflection, state.residual, y)  # T_ρ(y)
        beta = anchor_weight(state.gamma, count)
        y_next = tu.tree_lerp(beta, t_y, anchor)
        residual = tu.tree_sub(fn(y_next, args), y_next)
        gamma = state.gamma
        if self.contraction is None:
            t_next = tu.tree_axpy(1.0 + self.reflection, residual, y_next)
            gamma = _secant(gamma, tu.tree_sub(t_next, t_y), tu.tree_sub(y_next, y))
        return y_next, HalpernState(
            residual,
            anchor,
            gamma,
            anchor_norm,
            norm,
            count + 1,
            state.steps + 1,
            restarts,
        )

    def summary(self, state) -> dict:
        return {"restarts": state.restarts, "contraction": state.gamma}

    def displacement(self, y, y0, num_steps, state):
        # Halpern's residual converges to v at O(1/k), where Picard's does at
        # O(1/√k) (Park & Ryu 2023, "Accelerated infeasibility detection of
        # constrained optimization and fixed-point iterations").
        return state.residual


def anchor_weight(gamma, k):
    """β_k = 1/φ_{k+1} = (1 - q) q^{k+1} / (1 - q^{k+2}) with q = γ²: 1/(k+2) at
    γ = 1, 0 at γ = 0, computed without overflow for small γ."""
    q = gamma**2
    k = k.astype(q.dtype)
    inside = (q > 0) & (q < 1)
    safe = jnp.where(inside, q, 0.5)
    log_q = jnp.log(safe)
    beta = (1 - safe) * jnp.exp((k + 1) * log_q) / -jnp.expm1((k + 2) * log_q)
    return jnp.where(inside, beta, jnp.where(q >= 1, 1 / (k + 2), 0.0))


def _restart(solver, y, norm, state):
    """(anchor, anchor norm, count, restarts) after the restart test at y."""
    if solver.restart is None:
        return state.anchor, state.anchor_norm, state.epoch, state.restarts
    restart = solver.restart(
        norm, state.anchor_norm, state.last_norm, state.epoch, state.steps
    )
    return (
        tu.tree_where(restart, y, state.anchor),
        jnp.where(restart, norm, state.anchor_norm),
        jnp.where(restart, 0, state.epoch),
        state.restarts + restart.astype(jnp.int32),
    )


def _secant(gamma, dt, dy):
    """max(γ, |ΔT| / |Δy|), capped at 1; unchanged when Δy = 0."""
    num, den = tu.two_norm(dt), tu.two_norm(dy)
    ratio = num / jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, jnp.clip(ratio, gamma, 1.0), gamma)
