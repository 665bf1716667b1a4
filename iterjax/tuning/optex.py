r"""OptEx: first-order optimisation with approximately parallelised iterations
(Shu, Fang, He & Yu, NeurIPS 2024).

A round of OptEx with parallelism N runs N steps of any optax optimiser in the
sequential time of one: N - 1 *proxy* steps take a gradient predicted by a
kernel model of the gradient history, then the N true gradients at the points
visited are evaluated at once (one `vmap`), the last of them takes the round's
real step, and all N join the history. With N = 1 it is the optimiser itself.

The gradient model is the posterior mean of a Gaussian process with an RBF
kernel k(θ, θ') = exp(-|θ - θ'|² / (2ℓ²)) on the `history` most recent points
X and gradients G (separate outputs, one kernel):

$$ \hat g(θ) = k(θ, X)\,(K + σ^2 I)^{-1} G. $$
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import _struct as struct
from .._checks import check_int, check_range
from .._optax import optax_init, optax_step
from .._tree import ravel
from .._types import Array


class OptExState(NamedTuple):
    opt_state: Any  # the optimiser's state
    points: Array  # [history, d]: parameters at which gradients were evaluated
    grads: Array  # [history, d]: the gradients there
    filled: Array  # [history] bool: the slots that hold an entry
    head: Array  # the next slot to write (a ring buffer)


class OptEx(struct.PyTreeNode):
    """OptEx around an optax optimiser; `init(params)` and `step(grad_fn, params,
    state) -> (params, state, info)` (one round), pure and jittable.

    `info`: "proxy_error", the relative error |ĝ - g| / |g| of the predicted
    gradients at the N - 1 proxy points (0 when N = 1; measured, since the true
    gradients there are evaluated anyway), and "gradients", the N evaluations of
    the round. The parallel evaluation is `jax.vmap(grad_fn)` over the N points:
    N-fold work in one sequential step, a saving in wall time only where the
    device has N-fold parallelism to spare.

    Attributes:
      optimizer: the optax optimiser (SGD, Adam, ...).
      parallelism: N >= 1.
      history: gradients kept for the model (>= N).
      lengthscale: ℓ > 0 of the RBF kernel, in the parameters' units.
      noise: σ² > 0, the kernel model's noise (relative to k(θ, θ) = 1).

    Examples:
      >>> import jax, jax.numpy as jnp, optax, iterjax
      >>> loss = lambda w: 0.5 * jnp.sum(jnp.array([1.0, 10.0]) * w**2)
      >>> def after_12_rounds(n):
      ...     optex = iterjax.tuning.OptEx(optax.sgd(0.1), n, lengthscale=3.0)
      ...     w, state = jnp.ones(2), optex.init(jnp.ones(2))
      ...     for _ in range(12):
      ...         w, state, info = optex.step(jax.grad(loss), w, state)
      ...     return float(loss(w))
      >>> after_12_rounds(1) > 1000 * after_12_rounds(4)  # SGD alone: N = 1
      True
    """

    optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    parallelism: int = struct.field(pytree_node=False, default=4)
    history: int = struct.field(pytree_node=False, default=32)
    lengthscale: float = 1.0
    noise: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.optimizer, optax.GradientTransformation):
            raise TypeError(
                "OptEx: `optimizer` must be an optax.GradientTransformation, got "
                f"{type(self.optimizer).__name__}"
            )
        check_int("OptEx", "parallelism", self.parallelism, 1)
        check_int("OptEx", "history", self.history, self.parallelism)
        check_range("OptEx", "lengthscale", self.lengthscale, 0.0, lo_open=True)
        check_range("OptEx", "noise", self.noise, 0.0, lo_open=True)

    def init(self, params) -> OptExState:
        flat, _ = ravel(params)
        empty = jnp.zeros((self.history, flat.shape[0]), flat.dtype)
        return OptExState(
            optax_init(self.optimizer, params),
            empty,
            empty,
            jnp.zeros(self.history, bool),
            jnp.int32(0),
        )

    def predict(self, params, state: OptExState):
        """ĝ(params), the kernel model's gradient (0 before any history)."""
        flat, unravel = ravel(params)
        return unravel(self._mean(flat, state, self._factor(state)))

    def _kernel(self, a, b):
        sq = jnp.sum((a[:, None] - b[None]) ** 2, axis=-1)
        return jnp.exp(-sq / (2 * self.lengthscale**2))

    def _factor(self, state):
        """The Cholesky factor of K + σ²I over the filled slots (identity on the
        empty ones): the history is fixed for a round, so it is factored once."""
        both = state.filled[:, None] & state.filled[None]
        gram = jnp.where(both, self._kernel(state.points, state.points), 0.0)
        gram = gram + jnp.diag(jnp.where(state.filled, self.noise, 1.0))
        return jax.scipy.linalg.cho_factor(gram)

    def _mean(self, flat, state, factor):
        k = jnp.where(state.filled, self._kernel(flat[None], state.points)[0], 0.0)
        weights = jax.scipy.linalg.cho_solve(factor, k)
        return weights @ jnp.where(state.filled[:, None], state.grads, 0.0)

    def step(self, grad_fn, params, state: OptExState):
        flat0, unravel = ravel(params)
        factor = self._factor(state)

        def proxy(carry, _):
            flat, opt_state = carry
            guess = self._mean(flat, state, factor)
            new, opt_state = optax_step(
                self.optimizer, unravel(guess), opt_state, unravel(flat)
            )
            return (ravel(new)[0], opt_state), (flat, guess)

        steps = self.parallelism - 1
        (last, opt_state), (visited, guesses) = jax.lax.scan(
            proxy, (flat0, state.opt_state), None, length=steps
        )
        points = jnp.concatenate([visited, last[None]])
        grads = jax.vmap(lambda p: ravel(grad_fn(unravel(p)))[0])(points)
        new, opt_state = optax_step(
            self.optimizer, unravel(grads[-1]), opt_state, unravel(last)
        )
        slots = (
            state.head + jnp.arange(self.parallelism, dtype=jnp.int32)
        ) % self.history
        history = OptExState(
            opt_state,
            state.points.at[slots].set(points),
            state.grads.at[slots].set(grads),
            state.filled.at[slots].set(True),
            (state.head + self.parallelism) % self.history,
        )
        error = jnp.linalg.norm(guesses - grads[:-1], axis=-1) / jnp.maximum(
            jnp.linalg.norm(grads[:-1], axis=-1), jnp.finfo(grads.dtype).tiny
        )
        proxy_error = jnp.mean(error) if steps else jnp.zeros((), grads.dtype)
        info = {"proxy_error": proxy_error, "gradients": self.parallelism}
        return new, history, info
