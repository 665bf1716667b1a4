r"""Stochastic bilevel solvers as pure `init` / `step` pairs (optax style).

All solve min_θ F(θ) = f(w*(θ), θ), w*(θ) = argmin_w g(w, θ), from minibatch
oracles `inner_loss(w, theta, batch)` and `outer_loss(w, theta, batch)`. The
outer update is any optax optimiser applied to the method's estimate of ∇F:

    solver = iterjax.bilevel.SOBA(inner_loss, outer_loss, optax.sgd(1e-2))
    state = solver.init(theta0, w0)
    state, info = solver.step(state, inner_batch, outer_batch)   # jit me
    theta = state.theta

Methods (H = ∂²g/∂w², all products matrix-free):

* `SOBA` (Dagréou et al. 2022): single loop; w, v and θ move together,
  w -= ρ ∇_w g,  v -= ρ (H v + ∇_w f),  d = ∇_θ f + ∂²_θw g v.
* `StocBiO` (Ji et al. 2021): `inner_steps` SGD steps on w (warm-started), then
  v ≈ -η Σ_{q<Q} (I - η H)^q ∇_w f (stochastic Neumann series), d as in SOBA.
* `AmIGO` (Arbel & Mairal 2022): `inner_steps` warm-started SGD steps on w and
  `v_steps` warm-started SGD steps on the quadratic ½ vᵀHv + vᵀ∇_w f, d as in
  SOBA.
* `SABA` (Dagréou et al. 2022): SOBA with SAGA variance reduction over finite
  sums: the oracles take an index batch, and per-sample tables of the last
  directions make every estimate's variance vanish at the solution, so constant
  steps converge (linearly for strongly convex inner problems).
* `F2SA` (Kwon et al. 2023): first order only; z tracks argmin g, y tracks
  argmin f/λ + g (`inner_steps` SGD steps each), d = ∇_θ f(y) + λ(∇_θ g(y) -
  ∇_θ g(z)), with λ growing by `lam_growth` per step up to `lam_max`.

`info` reports the oracle calls of the step, each on the batch passed to `step`:
`grads` (gradients of f or g) and `hvps` (Hessian- or mixed-vector products);
and `finite`, False once a step made the state non-finite (a NaN sample).

Solvers with inner loops (StocBiO, AmIGO) take either one inner batch for every
inner oracle call of a step, or `Batches(stack)`: a fresh batch for each call,
stacked on a leading axis (call t uses stack[t mod len]; `solver.inner_batches`
calls a step), as their papers sample them.
"""

import abc
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import _struct as struct
from .. import _tree as tu
from .._checks import check_range
from .._module import Module
from .._optax import optax_init, optax_step
from .._types import Array, Int


class Batches(NamedTuple):
    """Minibatches stacked on a leading axis, one per inner oracle call of a
    step (StocBiO, AmIGO): call t of a step uses `stack[t mod len]`."""

    stack: Any


def _nth(batch, t):
    """The batch of inner oracle call t: `batch` itself, or a `Batches`
    stack's entry t (cyclically)."""
    if not isinstance(batch, Batches):
        return batch
    size = jax.tree.leaves(batch.stack)[0].shape[0]
    return jax.tree.map(
        lambda a: jax.lax.dynamic_index_in_dim(a, t % size, keepdims=False),
        batch.stack,
    )


class BilevelState(NamedTuple):
    theta: Any  # the outer variables
    w: Any  # the inner variables (F2SA: z, tracking argmin g)
    aux: Any  # method-specific: SOBA/StocBiO v; F2SA (y, λ)
    opt_state: Any  # the outer optax state
    step: Int[Array, ""]


def _info(grads, hvps):
    return {"grads": jnp.int32(grads), "hvps": jnp.int32(hvps)}


def _with_finite(new, info):
    """`(new, info)` with info["finite"]: whether the new state is finite (a NaN
    sample makes it NaN, and a loop that reads only θ would not see it)."""
    state = (new.theta, new.w, new.aux)
    return new, {**info, "finite": tu.all_finite(state)}


class _Stochastic(Module):
    """The losses, θ's optimiser and the inner step size every solver shares.

    `inner_lr` is keyword-only and, like every float hyperparameter here, a
    pytree leaf: a `jax.vmap` over solvers sweeps step sizes in one program.
    """

    inner_loss: Any = struct.field(pytree_node=False)
    outer_loss: Any = struct.field(pytree_node=False)
    outer_optimizer: optax.GradientTransformation = struct.field(pytree_node=False)
    inner_lr: float = struct.field(default=0.1, kw_only=True)

    def __post_init__(self):
        name = type(self).__name__
        if not (callable(self.inner_loss) and callable(self.outer_loss)):
            raise TypeError(f"{name}: `inner_loss` and `outer_loss` must be callable")
        if not isinstance(self.outer_optimizer, optax.GradientTransformation):
            raise TypeError(
                f"{name}: `outer_optimizer` must be an optax.GradientTransformation"
            )
        check_range(name, "inner_lr", self.inner_lr, lo=0.0, lo_open=True)

    @property
    @abc.abstractmethod
    def oracles(self) -> tuple[float, float]:
        """(gradients, HVPs) per step, each on a minibatch of each loss (on
        average, for a method whose steps differ)."""

    @abc.abstractmethod
    def init(self, theta, w0) -> BilevelState:
        """The state at θ = theta, w = w0."""

    @abc.abstractmethod
    def step(self, state, inner_batch, outer_batch):
        """One outer step on a minibatch of each loss: `(state, info)`."""

    @property
    def inner_batches(self) -> int:
        """Inner oracle calls a step: the length of a `Batches` stack that
        gives each its own batch (1: the step takes one batch, not a stack)."""
        return 1

    def _check_batches(self, inner_batch, outer_batch):
        """An empty minibatch (a leaf with a leading axis of size 0) would move
        the step and oracle counts but not θ: refuse it, naming the batch; so
        is a `Batches` stack where the solver takes one batch."""
        name = type(self).__name__
        if isinstance(outer_batch, Batches) or (
            isinstance(inner_batch, Batches) and self.inner_batches == 1
        ):
            raise ValueError(
                f"{name}.step: `Batches` (a stack of minibatches) is for the inner "
                "batch of a solver with inner loops (StocBiO, AmIGO)"
            )
        if isinstance(inner_batch, Batches):
            inner_batch = inner_batch.stack  # each entry: the same checks
            inner_batch = jax.tree.map(lambda a: a[0], inner_batch)
        for what, batch in (("inner_batch", inner_batch), ("outer_batch", outer_batch)):
            leaves = jax.tree_util.tree_leaves_with_path(batch)
            for _, leaf in leaves:
                if jnp.ndim(leaf) and jnp.shape(leaf)[0] == 0:
                    raise ValueError(
                        f"{name}.step: `{what}` is empty (a leaf of shape "
                        f"{jnp.shape(leaf)}); every step needs at least one sample"
                    )
            sizes = {jnp.shape(a)[0] for _, a in leaves if jnp.ndim(a)}
            if len(sizes) > 1:
                shapes = ", ".join(
                    f"{what}{jax.tree_util.keystr(k)}: {jnp.shape(a)}"
                    for k, a in leaves
                )
                raise ValueError(
                    f"{name}.step: the leaves of `{what}` have different numbers "
                    f"of samples (leading axes: {shapes})"
                )

    def _outer_update(self, state, direction, w, aux):
        theta, opt_state = optax_step(
            self.outer_optimizer, direction, state.opt_state, state.theta
        )
        return BilevelState(theta, w, aux, opt_state, state.step + 1)

    def _init(self, theta, w, aux):
        opt_state = optax_init(self.outer_optimizer, theta)
        state = BilevelState(theta, w, aux, opt_state, jnp.int32(0))
        # Strongly typed leaves: a weakly typed θ0 (`jnp.full(d, -2.0)`) would
        # come back strong from the first step, and a jitted `step` compile twice.
        return jax.tree.map(lambda a: jnp.asarray(a, jnp.asarray(a).dtype), state)


def _grad_w(loss, w, theta, batch):
    return jax.grad(loss)(w, theta, batch)


def _hvp(loss, w, theta, batch, v):
    return jax.jvp(lambda w: _grad_w(loss, w, theta, batch), (w,), (v,))[1]


def _sgd(loss, w, theta, batch, lr, steps, first=0):
    """`steps` SGD steps w <- w - lr ∇_w loss(w, θ, batch_t) (a fori_loop), on
    inner oracle calls t = first, first + 1, ... (`_nth`)."""

    def step(t, w):
        return tu.tree_axpy(-lr, _grad_w(loss, w, theta, _nth(batch, first + t)), w)

    return jax.lax.fori_loop(0, steps, step, w)


def _cross(loss, w, theta, batch, v):
    """∂²_θw g · v = ∂_θ <∇_w g(w, θ), v>."""
    return jax.vjp(lambda t: _grad_w(loss, w, t, batch), theta)[1](v)[0]


def _soba_update(g, f, w, theta, v, rho, inner_batch, outer_batch):
    """SOBA's step of (w, v) at θ, and the hypergradient estimate there:
    (w - ρ ∇_w g, v - ρ (H v + ∇_w f), ∇_θ f + ∂²_θw g v)."""
    d_v, d_t = _soba_directions(g, f, w, theta, v, inner_batch, outer_batch)
    w = tu.tree_axpy(-rho, _grad_w(g, w, theta, inner_batch), w)
    return w, tu.tree_axpy(-rho, d_v, v), d_t


def _soba_directions(g, f, w, theta, v, inner_batch, outer_batch):
    """SOBA's directions at (w, θ, v): (d_v, d_θ) = (H v + ∇_w f, ∇_θ f + ∂²_θw g v),
    v's step and the hypergradient estimate (also BO-REP's)."""
    f_w, f_t = jax.grad(f, (0, 1))(w, theta, outer_batch)
    d_v = tu.tree_add(_hvp(g, w, theta, inner_batch, v), f_w)
    d_t = tu.tree_add(f_t, _cross(g, w, theta, inner_batch, v))
    return d_v, d_t
