"""The glue to optax, in one place: its init and update under standard dtype
promotion (optax mixes int step counts with float parameters, which strict
promotion, iterjax's test setting and a user's choice, refuses)."""

import jax
import optax


def optax_init(optimizer, params):
    """`optimizer.init(params)`; optax mixes int and float (its step counts), so
    under strict dtype promotion it needs standard promotion."""
    with jax.numpy_dtype_promotion("standard"):
        return optimizer.init(params)


def optax_step(optimizer, grads, state, params):
    """One optax step: `(params + update(grads), new state)`, as `optax_init`."""
    with jax.numpy_dtype_promotion("standard"):
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state
