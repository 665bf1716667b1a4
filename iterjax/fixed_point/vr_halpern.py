"""Variance-reduced Halpern iteration for finite-sum maps."""

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_int
from .._iterate import AbstractFixedPointSolver, residual_status
from .._types import Array, Int, PRNGKeyArray, PyTree, Y
from .halpern import Halpern


class VRHalpernState(NamedTuple):
    residual: Y  # T̃(y) - y (exact, T(y) - y, after a full pass)
    halpern: PyTree  # the Halpern iteration's state on the estimated map
    snapshot: Y  # w, where T was last evaluated in full
    t_snapshot: Y  # T(w)
    snapshot_step: Int[Array, ""]  # the step of the last full pass
    key: PRNGKeyArray  # PRNG key data for the minibatches
    calls: Int[Array, ""]  # component evaluations so far
    full_passes: Int[Array, ""]


class VRHalpern(AbstractFixedPointSolver):
    """Halpern iteration on an SVRG estimate of a finite-sum map T = (1/n) Σ_i T_i.

    Used through `iterjax.finite_sum_fixed_point(fn, y0, args, num_terms=n)`, whose
    `fn(y, args, i)` is the component T_i. From a snapshot w with T(w) known
    (one full pass, n component calls), each step estimates T at the new iterate
    from a minibatch B of |B| = `batch` components (Johnson & Zhang 2013)::

        T̃(y) = T(w) + (1/|B|) Σ_{i in B} (T_i(y) - T_i(w))

    an unbiased estimate whose variance vanishes as y -> w, and takes the Halpern
    step y_{k+1} = β_k y_a + (1 - β_k) T̃(y_k) (`halpern` holds the anchoring,
    restart and reflection settings). Every `period` steps the snapshot moves to
    the current iterate with a full pass, which also makes that step's residual
    exact; so it does whenever the estimate passes the stopping test, so that
    the solve stops on an exact residual only. Per step 2|B| component calls
    instead of n: with |B| = √n and a period of √n, about 3√n, so the saving over
    Halpern grows like √n (Cai, Oikonomou & Zheng 2024, "Variance reduced Halpern
    iteration for finite-sum monotone inclusions").
    `Solution.stats["component_calls"]` counts them.

    Attributes:
      batch: |B| >= 1, or None for ⌈√n⌉.
      period: steps between full passes >= 1, or None for ⌈n / batch⌉.
      halpern: the `Halpern` settings (default: the classical anchor weights,
        1/(k+2), with restarts).
      seed: the minibatches' PRNG seed.
      atol, rtol, norm: the stopping rule, set by `finite_sum_fixed_point`.
    """

    batch: int | None = struct.field(pytree_node=False, default=None)
    period: int | None = struct.field(pytree_node=False, default=None)
    halpern: Halpern = Halpern(contraction=1.0)
    seed: int = struct.field(pytree_node=False, default=0)
    atol: float = 0.0
    rtol: float = 0.0
    norm: Callable = struct.field(pytree_node=False, default=tu.max_abs)

    def __post_init__(self):
        if self.batch is not None:
            check_int("VRHalpern", "batch", self.batch, 1)
        if self.period is not None:
            check_int("VRHalpern", "period", self.period, 1)
        if not isinstance(self.halpern, Halpern):
            raise TypeError(
                f"VRHalpern: `halpern` must be a Halpern, got {self.halpern!r}"
            )

    def sizes(self, n: int) -> tuple[int, int]:
        """(batch, period) for n components."""
        batch = min(self.batch or math.ceil(math.sqrt(n)), n)
        return batch, self.period or math.ceil(n / batch)

    def init(self, fn, y0, args):
        if not isinstance(fn, FiniteSum):
            raise TypeError(
                "VRHalpern solves finite sums: call it through "
                "iterjax.finite_sum_fixed_point(fn, y0, args, num_terms=n)"
            )
        n = fn.num_terms
        t0 = fn(y0, args)  # a full pass
        residual = tu.tree_sub(t0, y0)
        halpern = self.halpern.init(lambda *_: t0, y0, args)
        key = jax.random.key_data(jax.random.key(self.seed))
        n_calls, zero = jnp.int32(n), jnp.int32(0)
        return VRHalpernState(residual, halpern, y0, t0, zero, key, n_calls, zero)

    def step(self, fn, y, args, state):
        n = fn.num_terms
        batch, period = self.sizes(n)
        key, sub = jax.random.split(jax.random.wrap_key_data(state.key))
        idx = jax.random.randint(sub, (batch,), 0, n)  # with replacement

        def estimate(z, a):  # T̃(z) = T(w) + mean_B (T_i(z) - T_i(w))
            diff = tu.tree_sub(fn(z, a, idx), fn(state.snapshot, a, idx))
            return tu.tree_add(state.t_snapshot, diff)

        y_next, halpern = self.halpern.step(estimate, y, args, state.halpern)
        # A full pass every `period` steps, and whenever the estimate passes the
        # stopping test: the driver then stops on an exact residual only.
        since = halpern.steps - state.snapshot_step
        passes, _, _ = residual_status(
            y_next, halpern.residual, self.atol, self.rtol, self.norm
        )
        full = (since >= period) | passes

        def snapshot(_):
            t = fn(y_next, args)
            return t, tu.tree_sub(t, y_next), y_next

        def keep(_):
            return state.t_snapshot, halpern.residual, state.snapshot

        t_w, residual, w = jax.lax.cond(full, snapshot, keep, None)
        calls = state.calls + 2 * batch + jnp.where(full, n, 0)
        return y_next, VRHalpernState(
            residual,
            halpern._replace(residual=residual),
            w,
            t_w,
            jnp.where(full, halpern.steps, state.snapshot_step),
            jax.random.key_data(key),
            calls,
            state.full_passes + full.astype(jnp.int32),
        )

    def summary(self, state) -> dict:
        return {
            **self.halpern.summary(state.halpern),
            "component_calls": state.calls,
            "full_passes": state.full_passes,
        }

    def displacement(self, y, y0, num_steps, state):
        return self.halpern.displacement(y, y0, num_steps, state.halpern)


class FiniteSum:
    """The map T(y, args) = (1/n) Σ_i fn(y, args, i), callable on all components
    (`T(y, args)`) or on a minibatch of indices (`T(y, args, idx)`, its mean)."""

    def __init__(self, fn, num_terms: int):
        self.fn, self.num_terms = fn, num_terms

    def __call__(self, y, args, idx=None):
        if idx is None:
            idx = jnp.arange(self.num_terms)
        values = jax.vmap(lambda i: self.fn(y, args, i))(idx)
        return jax.tree_util.tree_map(
            lambda v, y: jnp.mean(v, 0).astype(y.dtype), values, y
        )
