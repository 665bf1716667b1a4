"""Multinomial logistic regression on the datasets scikit-learn ships (digits,
breast_cancer, wine): the problems of `schedules` and `optex`."""

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import datasets


def load(name):
    x, y = getattr(datasets, f"load_{name}")(return_X_y=True)
    x = (x - x.mean(0)) / np.maximum(x.std(0), 1e-12)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    return jnp.asarray(x, jnp.float64), jnp.asarray(y, jnp.int32), int(y.max()) + 1


def objective(X, Y, l2):
    """f(W, idx): the mean cross-entropy over rows idx plus ½ λ |W|²."""

    def f(W, idx=None):
        x, y = (X, Y) if idx is None else (X[idx], Y[idx])
        logits = x @ W
        ce = jnp.mean(
            jax.nn.logsumexp(logits, 1)
            - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
        )
        return ce + 0.5 * l2 * jnp.sum(W**2)

    return f
