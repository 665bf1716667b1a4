"""MADE (Germain et al. 2015) on binarised digits, and its sampling as a causal model
for `iterjax.jacobi_decode`.

A MADE maps a binary image x [D] to D logits, logit i depending on x_<i only
(masked weights: hidden unit k has a degree m_k in 1..D-1; input d feeds units
with m_k >= d, and output d reads units with m_k < d). Sampling with fixed
uniform noise u is then the feed-forward chain x_d = 1[u_d < σ(logit_d(x_<d))],
d = 1..D (Song et al. 2021): sequential in D calls, or by Jacobi sweeps that
evaluate the network once per sweep on the current guesses.

The images are sklearn's digits thresholded at half intensity, at 4x4 (block
means), 8x8, or 16x16 (each pixel repeated 2x2): D = 16, 64, 256.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iterjax.experiments.common import training
from iterjax.experiments.common.deq_models import load_digits
from iterjax.lab.spec import Count, Positive


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    hidden: Count = 256
    steps: Count = 2000
    batch: Count = 128
    lr: Positive = 3e-3
    seed: int = 0


def binarised(side: int):
    """(train, test) binary images [n, side²] as float32, side in {4, 8, 16}."""
    xtr, _, xte, _ = load_digits()

    def resize(x):
        img = x.reshape(-1, 8, 8)
        if side == 4:
            img = img.reshape(-1, 4, 2, 4, 2).mean((2, 4))
        elif side == 16:
            img = np.kron(img, np.ones((1, 2, 2), img.dtype))
        elif side != 8:
            raise ValueError(f"made: `side` must be 4, 8 or 16, got {side}")
        return (img.reshape(len(x), -1) > 0.5).astype(np.float32)

    return resize(xtr), resize(xte)


class MaskedLinear(nnx.Module):
    def __init__(self, mask: np.ndarray, rngs: nnx.Rngs):
        self.linear = nnx.Linear(mask.shape[0], mask.shape[1], rngs=rngs)
        self.mask = nnx.Variable(jnp.asarray(mask, jnp.float32))

    def __call__(self, x):
        w = self.linear.kernel[...] * self.mask[...]
        b = self.linear.bias[...].astype(x.dtype)
        return x @ w.astype(x.dtype) + jnp.reshape(b, (1,) * (x.ndim - 1) + b.shape)


class MADE(nnx.Module):
    """x [..., D] -> logits [..., D]; logit d depends on x_<d (two hidden layers)."""

    def __init__(self, dim: int, hidden: int, rngs: nnx.Rngs):
        rng = np.random.default_rng(0)
        d_in = np.arange(1, dim + 1)
        m1 = np.sort(rng.integers(1, dim, hidden))
        m2 = np.sort(rng.integers(1, dim, hidden))
        self.l1 = MaskedLinear((m1[None] >= d_in[:, None]).astype(np.float32), rngs)
        self.l2 = MaskedLinear((m2[None] >= m1[:, None]).astype(np.float32), rngs)
        self.out = MaskedLinear((d_in[None] > m2[:, None]).astype(np.float32), rngs)
        self.direct = MaskedLinear(np.triu(np.ones((dim, dim)), 1), rngs)

    def __call__(self, x):
        h = jax.nn.relu(self.l1(x))
        h = jax.nn.relu(self.l2(h))
        return self.out(h) + self.direct(x)


def nll(model, x):
    """Mean negative log-likelihood in bits per dimension."""
    bce = optax.sigmoid_binary_cross_entropy(model(x), x)
    return jnp.mean(bce) / jnp.log(2.0)


def train(side: int, cfg: TrainConfig):
    """A MADE on the binarised digits at `side`; returns (model, test bits/dim)."""
    x, xt = binarised(side)
    model = MADE(x.shape[1], cfg.hidden, nnx.Rngs(cfg.seed))

    def batches(k):
        idx = np.random.default_rng([cfg.seed, k]).integers(0, len(x), cfg.batch)
        return x[idx]

    training.fit(
        model, nll, cfg.steps, training.adam_cosine(cfg.lr, cfg.steps), batches
    )
    return model, float(nll(model, jnp.asarray(xt)))


def logits_fn(model: MADE, noise):
    """The MADE's sampling chain as a causal model for `iterjax.jacobi_decode`:
    tokens [1 + D] (a start token, then pixels) -> logits [1 + D, 2], where row d
    decides pixel d + 1 from the pixels before it: logits (0, l_d - logit(u_d)),
    so that greedy decoding takes x_d = 1[u_d < σ(l_d)] (one fixed uniform u per
    pixel: sampling, made deterministic)."""
    threshold = jnp.log(noise) - jnp.log1p(-noise)

    def fn(tokens):
        x = tokens[1:].astype(jnp.float32)
        margin = model(x) - threshold
        rows = jnp.stack([jnp.zeros_like(margin), margin], -1)
        return jnp.concatenate([rows, jnp.zeros((1, 2), rows.dtype)])

    return fn
