"""A trained diffusion model of sklearn's 8x8 digits, and the measures of its samples.

* `Denoiser`: a noise-prediction MLP (flax NNX) ε̂(x, t) for x the 64 pixels
  scaled to [-1, 1], conditioned on t in [T_MIN, 1] by sinusoidal features,
  under the variance-preserving process of `experiments.common.diffusion`
  (ᾱ(t) of a linear β schedule). Trained with the usual ε-regression loss.
* `Classifier`: an MLP digit classifier trained on the same split; its hidden
  layer gives the features of a Fréchet distance (FID's formula on a small,
  download-free feature extractor: "FD-digits").
* `sliced_wasserstein`: the sliced 2-Wasserstein distance between two sets of
  images in pixel space.

Both distances are also reported between the training and held-out images: the
floor that sampling can reach. Models are float32; `eps_fn` casts the weights
to the samples' dtype, so sampling can run in float64.
"""

import dataclasses
import pathlib
from typing import Annotated

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iterjax.experiments.common import checkpoints, diffusion, training
from iterjax.experiments.common.deq_models import load_digits
from iterjax.lab.registry import build
from iterjax.lab.spec import Count, Spec
from iterjax.sequence import samplers

T_MIN = 1e-3  # sampling ends here: ᾱ(T_MIN) = 0.9999


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    hidden: Count = 256
    layers: Count = 3
    frequencies: Count = 16  # sinusoidal features of t


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: Count = 6000
    batch: Count = 256
    # the denoiser's optax optimiser by name (iterjax.lab.optim), e.g.
    # {name: adam, learning_rate: {name: cosine, init_value: 2e-3, decay_steps: 6000}}
    optimizer: Annotated[Spec, "optimizer"] = Spec("adam", (("learning_rate", 2e-3),))
    classifier_steps: Count = 1500
    seed: int = 0


def images():
    """(train, train labels, test, test labels): pixels in [-1, 1], float32."""
    xtr, ytr, xte, yte = load_digits()
    return 2 * xtr - 1, ytr, 2 * xte - 1, yte


class Denoiser(nnx.Module):
    """ε̂(x, t): [..., 64] x [...] -> [..., 64], an MLP on (x, features of t)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, dim: int = 64):
        self.cfg = cfg
        sizes = [dim + 2 * cfg.frequencies] + [cfg.hidden] * cfg.layers
        self.layers = nnx.List(
            [nnx.Linear(a, b, rngs=rngs) for a, b in zip(sizes[:-1], sizes[1:])]
        )
        self.out = nnx.Linear(cfg.hidden, dim, rngs=rngs)

    def __call__(self, x, t):
        h = time_features(x, t, self.cfg.frequencies)
        for layer in self.layers:
            h = jax.nn.silu(layer(h))
        return self.out(h)


def time_features(x, t, frequencies: int):
    """(x, sin(2^k π t), cos(2^k π t)) for k < frequencies: the denoisers' input."""
    k = jnp.arange(frequencies, dtype=x.dtype)
    t = jnp.broadcast_to(jnp.asarray(t, x.dtype), x.shape[:-1])
    scales = jnp.reshape(jnp.pi * 2.0**k, (1,) * t.ndim + (-1,))
    angle = t[..., None] * scales
    return jnp.concatenate([x, jnp.sin(angle), jnp.cos(angle)], axis=-1)


def cast(model: nnx.Module, dtype):
    """A copy of `model` with its parameters in `dtype`."""
    graphdef, params, *rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype(dtype), params)
    return nnx.merge(graphdef, params, *rest)


class Classifier(nnx.Module):
    """Digit logits from 64 pixels; `features` is the hidden layer."""

    def __init__(self, rngs: nnx.Rngs, hidden: int = 128):
        self.hidden = nnx.Linear(64, hidden, rngs=rngs)
        self.head = nnx.Linear(hidden, 10, rngs=rngs)

    def features(self, x):
        return jax.nn.relu(self.hidden(x))

    def __call__(self, x):
        return self.head(self.features(x))


def denoising_loss(model, batch):
    x0, t, noise = batch
    ab = diffusion.alpha_bar(t)[:, None]
    xt = jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * noise
    return jnp.mean((model(xt, t) - noise) ** 2)


def train_denoiser(model_cfg: ModelConfig, cfg: TrainConfig, progress=None):
    """A `Denoiser` trained on the training digits; returns (model, losses)."""
    model = Denoiser(model_cfg, nnx.Rngs(cfg.seed))
    return model, fit_denoiser(model, cfg, progress)


def fit_denoiser(model, cfg: TrainConfig, progress=None) -> list[float]:
    """Train any noise-prediction model `model(x_t, t)` on the training digits
    with `denoising_loss` and `cfg.optimizer` (in place); returns the losses."""
    x, _, _, _ = images()

    def batches(k):
        rng = np.random.default_rng([cfg.seed, k])
        idx = rng.integers(0, len(x), cfg.batch)
        t = rng.uniform(T_MIN, 1.0, cfg.batch).astype(np.float32)
        noise = rng.standard_normal((cfg.batch, 64)).astype(np.float32)
        if progress is not None:
            progress()
        return x[idx], t, noise

    opt = build("optimizer", cfg.optimizer)
    return training.fit(model, denoising_loss, cfg.steps, opt, batches)


def train_classifier(cfg: TrainConfig):
    """A `Classifier` on the training digits; returns (model, test accuracy)."""
    x, y, xt, yt = images()
    model = Classifier(nnx.Rngs(cfg.seed + 1))

    def loss(model, batch):
        xb, yb = batch
        return optax.softmax_cross_entropy_with_integer_labels(model(xb), yb).mean()

    def batches(k):
        idx = np.random.default_rng([cfg.seed + 1, k]).integers(0, len(x), 128)
        return x[idx], y[idx]

    opt = training.adam_cosine(3e-3, cfg.classifier_steps)
    training.fit(model, loss, cfg.classifier_steps, opt, batches)
    accuracy = float(np.mean(np.argmax(np.asarray(model(xt)), -1) == yt))
    return model, accuracy


def save(denoiser: Denoiser, classifier: Classifier, path: pathlib.Path) -> None:
    """Both models under `path` (`denoiser/`, `classifier/`)."""
    checkpoints.save(denoiser, path / "denoiser", dataclasses.asdict(denoiser.cfg))
    checkpoints.save(classifier, path / "classifier", {})


def load(path: pathlib.Path) -> tuple[Denoiser, Classifier]:
    cfg = ModelConfig(**checkpoints.meta(path / "denoiser"))
    denoiser = checkpoints.restore(Denoiser(cfg, nnx.Rngs(0)), path / "denoiser")
    classifier = checkpoints.restore(Classifier(nnx.Rngs(0)), path / "classifier")
    return denoiser, classifier


def eps_fn(model: Denoiser, dtype=jnp.float64):
    """`eps(x, t, alpha_bar)` for `iterjax.sequence.samplers`, the weights cast to
    `dtype` (float64 by default: the sampling chains are compared to 1e-6)."""
    model = cast(model, dtype)
    return lambda x, t, ab: model(x, t)


def sampling_steps(num_steps: int):
    """`SamplerSteps` of an N-step chain from t = 1 to T_MIN, uniform in t."""
    times = jnp.linspace(1.0, T_MIN, num_steps + 1)
    return samplers.sampler_steps(times, diffusion.alpha_bar)


def sliced_wasserstein(a, b, projections: int = 256, seed: int = 0) -> float:
    """Sliced 2-Wasserstein distance between image sets a [n, 64] and b [m, 64]:
    the root mean over random unit directions of the squared 1-D W2 distance of
    the projections (quantiles at n + m levels when n != m)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    rng = np.random.default_rng(seed)
    dirs = rng.standard_normal((a.shape[1], projections))
    dirs /= np.linalg.norm(dirs, axis=0)
    levels = np.linspace(0, 1, len(a) + len(b))
    qa = np.quantile(a @ dirs, levels, axis=0)
    qb = np.quantile(b @ dirs, levels, axis=0)
    return float(np.sqrt(np.mean((qa - qb) ** 2)))


def frechet_distance(fa, fb) -> float:
    """||μ_a - μ_b||² + Tr(Σ_a + Σ_b - 2 (Σ_a Σ_b)^½) of two feature sets (FID's
    formula). Tr (Σ_a Σ_b)^½ is the sum of the square roots of the eigenvalues
    of the symmetric Σ_a^½ Σ_b Σ_a^½ (stable when the covariances are singular)."""
    fa, fb = np.asarray(fa, np.float64), np.asarray(fb, np.float64)
    mu = fa.mean(0) - fb.mean(0)
    ca, cb = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    w, v = np.linalg.eigh(ca)
    half = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    root = np.sqrt(np.clip(np.linalg.eigvalsh(half @ cb @ half), 0, None)).sum()
    return float(mu @ mu + np.trace(ca) + np.trace(cb) - 2 * root)


def quality(samples, classifier: Classifier) -> dict:
    """FD-digits and sliced W2 of `samples` [n, 64] against the held-out images,
    and the share of samples the classifier assigns with probability > 0.9."""
    _, _, test, _ = images()
    x = jnp.asarray(np.clip(np.asarray(samples), -1, 1), jnp.float32)
    probs = jax.nn.softmax(classifier(x), -1)
    return dict(
        fd=frechet_distance(
            classifier.features(x), classifier.features(jnp.asarray(test))
        ),
        sw=sliced_wasserstein(x, test),
        confident=float(jnp.mean(jnp.max(probs, -1) > 0.9)),
    )


def show(ax, images, title):
    """Up to 64 images of 8 x 8 pixels in [-1, 1], eight to a row, on `ax`."""
    images = np.asarray(images)[:64]
    grid = np.ones((9 * -(-len(images) // 8), 8 * 9))
    for i, x in enumerate(images):
        r, c = divmod(i, 8)
        grid[9 * r : 9 * r + 8, 9 * c : 9 * c + 8] = (
            1 - np.clip(x, -1, 1).reshape(8, 8)
        ) / 2
    ax.imshow(grid, cmap="gray", vmin=0, vmax=1)
    ax.set(title=title, xticks=[], yticks=[])
