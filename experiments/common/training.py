"""One small training loop for the experiments' NNX models."""

import jax
import optax
from flax import nnx


def adam_cosine(lr: float, steps: int) -> optax.GradientTransformation:
    """Adam with its step decayed from `lr` to 0 over `steps` by a cosine."""
    return optax.adam(optax.cosine_decay_schedule(lr, steps))


def fit(model: nnx.Module, loss, steps: int, opt, batches) -> list[float]:
    """`opt` (an optax transformation, e.g. `adam_cosine`) on `loss(model,
    batch)` over `batches(k)`, k = 0 .. steps - 1, updating `model`'s
    `nnx.Param`s in place (its other variables, masks say, stay as they are).
    Returns the losses."""
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
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
