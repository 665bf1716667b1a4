"""One small training loop for the experiments' NNX models."""

import jax
import optax
from flax import nnx


def fit(model: nnx.Module, loss, steps: int, lr: float, batches) -> list[float]:
    """Adam with a cosine-decayed step on `loss(model, batch)` over `batches(k)`,
    k = 0 .. steps - 1, updating `model`'s `nnx.Param`s in place (its other
    variables, masks say, stay as they are). Returns the losses."""
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    opt = optax.adam(optax.cosine_decay_schedule(lr, steps))
    state = opt.init(params)

    @jax.jit
    def step(params, state, batch):
        value, g = jax.value_and_grad(
            lambda p: loss(nnx.merge(graphdef, p, *rest), batch)
        )(params)
        with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
            updates, state = opt.update(g, state, params)
            return optax.apply_updates(params, updates), state, value

    losses = []
    for k in range(steps):
        params, state, value = step(params, state, batches(k))
        losses.append(float(value))
    nnx.update(model, params)
    return losses
