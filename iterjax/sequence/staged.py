"""Recurrences whose state changes shape along the sequence, as one scan."""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class Staged(NamedTuple):
    """A recurrence whose state changes shape between stages (see `staged`).

    Attributes:
      init: the first stage's initial state -> the carry (one buffer per stage).
      inputs: (stages [T] ints, nondecreasing from 0; xs) -> the scan's xs.
      step: (carry, one row of `inputs`) -> (next carry, None), the scan body.
      read: carry -> the last stage's state.
    """

    init: Callable[[Any], Any]
    inputs: Callable[[Any, Any], Any]
    step: Callable[[Any, Any], tuple[Any, None]]
    read: Callable[[Any], Any]


def staged(steps, lifts) -> Staged:
    """A coarse-to-fine recurrence as one scan: DreamPropeller's generalised
    Picard (Zhou et al. 2024) for a state whose dimension changes along the path.

    Stage j updates its state by `steps[j](state, x)`; where the stage increases
    from j to j + 1, the step first lifts the state, `lifts[j](state)` (an
    upsampling, say), then applies `steps[j + 1]`. `iterjax.scan` needs one carry
    shape, so the carry holds one buffer per stage: a step changes only its
    stage's buffer, and the buffers of later stages hold their initial value
    (zeros, exact) until the lift fills them. Every parallel method then solves
    the staged chain; Picard needs no `diagonal`, as inactive buffers keep
    their values exactly.

    Args:
      steps: K functions, stage j's update (state_j, x) -> state_j.
      lifts: K - 1 functions, state_j -> state_{j+1}.

    Example:
      >>> import jax.numpy as jnp, iterjax
      >>> s = iterjax.sequence.staged(
      ...     [lambda h, x: 0.9 * h + x, lambda h, x: 0.9 * h + x],
      ...     [lambda h: jnp.repeat(h, 2)])                  # 2 values -> 4
      >>> xs = s.inputs(jnp.array([0, 0, 1, 1]), jnp.ones(4))
      >>> c, _ = iterjax.scan(s.step, s.init(jnp.zeros(2)), xs, method=iterjax.Jacobi())
      >>> [round(v, 3) for v in s.read(c).tolist()]  # 4 steps of 0.9 h + 1
      [3.439, 3.439, 3.439, 3.439]
    """
    steps, lifts = list(steps), list(lifts)
    if len(lifts) != len(steps) - 1:
        raise ValueError(
            f"staged: {len(steps)} `steps` need {len(steps) - 1} `lifts`, got "
            f"{len(lifts)}"
        )

    def init(state):
        buffers = [state]
        for lift in lifts:
            shape = jax.eval_shape(lift, buffers[-1])
            buffers.append(jnp.zeros(shape.shape, shape.dtype))
        return tuple(buffers)

    def inputs(stages, xs):
        stages = jnp.asarray(stages)
        begins = jnp.concatenate([jnp.zeros(1, bool), stages[1:] != stages[:-1]])
        return stages, begins, xs

    def step(carry, row):
        stage, begins, x = row
        out = []
        for j, (buffer, update) in enumerate(zip(carry, steps)):
            # the state entering stage j's update: its own buffer, or the lift
            # of stage j - 1's where the stage begins
            entering = buffer
            if j > 0:
                lifted = lifts[j - 1](carry[j - 1])
                entering = jnp.where(begins & (stage == j), lifted, buffer)
            new = update(entering, x)
            out.append(jnp.where(stage == j, new, buffer))
        return tuple(out), None

    return Staged(init, inputs, step, lambda carry: carry[-1])
