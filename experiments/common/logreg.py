"""Multinomial logistic regression on the datasets scikit-learn ships (digits,
breast_cancer, wine) and on MNIST-1D (generated offline), with a linear model or
a one-hidden-layer MLP: the problems of `schedules` and `optex`."""

import jax
import jax.numpy as jnp
import numpy as np
from sklearn import datasets

from .deq_models import load_mnist1d


def load(name):
    """(X standardised with a bias column, labels, classes) of a sklearn dataset
    or of MNIST-1D's training split (4000 signals of 40 samples)."""
    if name == "mnist1d":
        x, y = load_mnist1d()[:2]
    else:
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


def mlp_objective(X, Y, l2, hidden, key):
    """(f(W, idx), W0) of a one-hidden-layer tanh MLP (LeCun-normal W0): the
    mean cross-entropy over rows idx plus ½ λ |W|²; non-convex."""
    classes = int(Y.max()) + 1
    k1, k2 = jax.random.split(key)
    init = jax.nn.initializers.lecun_normal()
    W0 = {
        "hidden": init(k1, (X.shape[1], hidden), X.dtype),
        "out": init(k2, (hidden + 1, classes), X.dtype),
    }

    def f(W, idx=None):
        x, y = (X, Y) if idx is None else (X[idx], Y[idx])
        h = jnp.tanh(x @ W["hidden"])
        logits = jnp.concatenate([h, jnp.ones_like(h[:, :1])], 1) @ W["out"]
        ce = jnp.mean(
            jax.nn.logsumexp(logits, 1)
            - jnp.take_along_axis(logits, y[:, None], 1)[:, 0]
        )
        squares = sum(jnp.sum(w**2) for w in jax.tree.leaves(W))
        return ce + 0.5 * l2 * squares

    return f, W0
