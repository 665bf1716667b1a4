"""Train the digits diffusion model (`experiments.common.digits_diffusion`): the
noise-prediction MLP and the classifier whose features score samples. Both are
checkpointed under `checkpoint/` in the run directory, where
`picard_diffusion_trained` finds them. Reports the loss curve, the classifier's
test accuracy, and the quality of 100-step DDIM samples beside the floor (the
training images scored against the held-out ones).
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from iterjax.experiments.common import digits_diffusion as dd
from iterjax.lab.spec import Count
from iterjax.sequence import samplers


@dataclasses.dataclass(frozen=True)
class Config:
    model: dd.ModelConfig = dd.ModelConfig()
    train: dd.TrainConfig = dd.TrainConfig()
    samples: Count = 256  # DDIM samples scored at the end
    sample_steps: Count = 100
    log_every: Count = 100
    x64: bool = True  # sampling chains in float64 (the models train in float32)


def train(model_cfg, train_cfg, workdir, log_every=100):
    """Both models, trained and saved under workdir/checkpoint; returns
    (denoiser, classifier, losses, test accuracy)."""
    with workdir.progress(train_cfg.steps, "training the denoiser") as advance:
        denoiser, losses = dd.train_denoiser(model_cfg, train_cfg, advance)
    for k in range(0, len(losses), log_every):
        window = losses[k : k + log_every]
        workdir.log("train", step=k + len(window), loss=float(np.mean(window)))
    classifier, accuracy = dd.train_classifier(train_cfg)
    dd.save(denoiser, classifier, workdir.path / "checkpoint")
    return denoiser, classifier, losses, accuracy


def floor(classifier) -> dict:
    """The distances between the training and the held-out images."""
    train_images, _, test, _ = dd.images()
    features = lambda x: classifier.features(jnp.asarray(x))
    return dict(
        fd=dd.frechet_distance(features(train_images), features(test)),
        sw=dd.sliced_wasserstein(train_images, test),
    )


def ddim_samples(denoiser, num_samples, num_steps, seed):
    s = samplers.ddim(dd.eps_fn(denoiser))
    z = jax.random.normal(jax.random.key(seed), (num_samples, 64))
    carry, _ = jax.jit(lambda z: jax.lax.scan(s.step, z, dd.sampling_steps(num_steps)))(
        z
    )
    return np.asarray(s.sample(carry))


def run(cfg: Config, workdir) -> dict:
    denoiser, classifier, losses, accuracy = train(
        cfg.model, cfg.train, workdir, cfg.log_every
    )
    x = ddim_samples(denoiser, cfg.samples, cfg.sample_steps, cfg.train.seed + 1)
    quality, reference = dd.quality(x, classifier), floor(classifier)
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.5))
    ax[0].semilogy(losses, lw=0.5)
    ax[0].set(title="denoising loss", xlabel="step", ylabel="E|ε̂ - ε|²")
    dd.show(ax[1], x, f"DDIM, {cfg.sample_steps} steps")
    dd.show(ax[2], dd.images()[2], "held-out digits")
    workdir.savefig(fig, "diffusion_train.png")
    return dict(
        final_loss=float(np.mean(losses[-cfg.log_every :])),
        classifier_accuracy=accuracy,
        samples=quality,
        floor=reference,
        checkpoint=str(workdir.path / "checkpoint"),
    )
