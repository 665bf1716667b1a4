"""Parallel sampling of a trained diffusion model: DDIM, PLMS (PNDM) and
DPM-Solver++(2M) as step maps (`iterjax.sequence.samplers`), solved by Picard
sweeps (ParaDiGMS) against sequential sampling.

The model is `diffusion_train`'s noise-prediction MLP on sklearn's 8x8 digits
(`checkpoint: latest` loads the newest run's; `""` trains one here). For each
sampler and number of steps N:

* sequential sampling: the discretisation error, the RMS distance (pixels in
  [-1, 1]) to the converged probability-flow sample (DPM-Solver++ at
  `reference_steps`), and the quality (FD-digits and sliced W2 against the
  held-out digits, `experiments.common.digits_diffusion`);
* for each parallel method: sweeps (the sequential depth in model calls), model
  evaluations, the largest difference from sequential sampling (the per-step
  atol is error_target / N), and the quality of the parallel samples.

Multistep samplers carry their history of model outputs, which a step replaces:
Picard gets `diagonal=sampler.increments(z)` (increments on the sample, Jacobi
updates on the history; DreamPropeller's generalised Picard).
"""

import dataclasses
from typing import Annotated, Literal

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

import iterjax as ij
from iterjax.experiments import diffusion_train
from iterjax.experiments.common import cells, checkpoints
from iterjax.experiments.common import digits_diffusion as dd
from iterjax.lab.config import Spec
from iterjax.lab.figures import PALETTE
from iterjax.lab.registry import build
from iterjax.lab.spec import Count, Positive
from iterjax.lab.tables import markdown_table
from iterjax.sequence import samplers

Sampler = Literal["ddim", "plms", "dpm_solver_pp"]


@dataclasses.dataclass(frozen=True)
class Config:
    # A diffusion_train checkpoint directory; "latest": the newest run under
    # runs/diffusion_train; "": train one here with `model` and `train`.
    checkpoint: str = "latest"
    model: dd.ModelConfig = dd.ModelConfig()
    train: dd.TrainConfig = dd.TrainConfig()
    samples: Count = 128  # samples drawn together (one carry [samples, 64])
    steps: tuple[Count, ...] = (25, 100, 250)
    samplers: tuple[Sampler, ...] = ("ddim", "plms", "dpm_solver_pp")
    methods: tuple[Annotated[Spec, "sequence_method"], ...] = (
        Spec("picard"),
        Spec("picard", (("window", 32),)),
    )
    error_target: Positive = 1e-3  # per-step atol = error_target / N
    reference_steps: Count = 2000  # DPM-Solver++ steps of the converged sample
    seed: int = 0
    x64: bool = True  # sampling chains in float64 (the models train in float32)


def load_models(cfg, workdir):
    path = checkpoints.find(
        cfg.checkpoint, workdir, "diffusion_train", "picard_diffusion_trained"
    )
    if path is None:
        denoiser, classifier, _, _ = diffusion_train.train(
            cfg.model, cfg.train, workdir
        )
        return denoiser, classifier, "trained here"
    denoiser, classifier = dd.load(path)
    return denoiser, classifier, str(path)


def method_for(spec, sampler, z):
    """The configured method; Picard gets the sampler's increments diagonal."""
    method = build("sequence_method", spec)
    if isinstance(method, ij.sequence.Picard):
        method = dataclasses.replace(method, diagonal=sampler.increments(z))
    return method


def measure(cfg, eps, classifier, name, N, z, converged_sample):
    s = getattr(samplers, name)(eps)
    steps = dd.sampling_steps(N)
    sequential = jax.jit(lambda z: s.sample(jax.lax.scan(s.step, s.init(z), steps)[0]))
    x_seq = sequential(z)
    base = dict(
        sampler=name,
        steps=N,
        discretisation=float(jnp.sqrt(jnp.mean((x_seq - converged_sample) ** 2))),
        **{f"sequential_{k}": v for k, v in dd.quality(x_seq, classifier).items()},
    )
    rows = []
    for spec in cfg.methods:
        method = method_for(spec, s, z)
        solve = jax.jit(
            lambda z, method=method: ij.scan(
                s.step,
                s.init(z),
                steps,
                method=method,
                atol=cfg.error_target / N,
                return_stats=True,
            )
        )
        carry, _, stats = solve(z)
        x = s.sample(carry)
        sweeps = int(stats.num_sweeps)
        rows.append(
            dict(
                base,
                method=spec.label,
                sweeps=sweeps,
                converged=bool(stats.converged),
                evaluations=int(stats.evaluations),
                depth=sweeps * cells.parallel_depth(method, N),
                error=cells.max_error(x, x_seq),
                **dd.quality(x, classifier),
            )
        )
    return rows, np.asarray(x_seq)


def run(cfg: Config, workdir) -> dict:
    denoiser, classifier, source = load_models(cfg, workdir)
    eps = dd.eps_fn(denoiser)
    z = jax.random.normal(jax.random.key(cfg.seed + 1), (cfg.samples, 64))
    reference = samplers.dpm_solver_pp(eps)
    converged_sample = jax.jit(
        lambda z: reference.sample(
            jax.lax.scan(
                reference.step,
                reference.init(z),
                dd.sampling_steps(cfg.reference_steps),
            )[0]
        )
    )(z)
    rows, images = [], {}
    with workdir.progress(len(cfg.samplers) * len(cfg.steps), "sampling") as advance:
        for name in cfg.samplers:
            for N in cfg.steps:
                new, images[(name, N)] = measure(
                    cfg, eps, classifier, name, N, z, converged_sample
                )
                for row in new:
                    workdir.log(**row)
                rows += new
                advance()
    floor = diffusion_train.floor(classifier)
    _plot(cfg, rows, images, workdir)
    return dict(model=source, rows=rows, floor=floor, table=_table(rows, floor))


def _plot(cfg, rows, images, workdir):
    fig, ax = plt.subplots(1, 3, figsize=(16, 5))
    labels = list(dict.fromkeys(r["method"] for r in rows))
    styles = ["o-", "s--", "^:", "d-."]
    for color, name in zip(PALETTE, cfg.samplers):  # one colour per sampler
        for style, label in zip(styles, labels):  # one line style per method
            pts = [
                (r["steps"], r["sweeps"])
                for r in rows
                if r["sampler"] == name and r["method"] == label
            ]
            ax[0].loglog(
                *np.asarray(pts).T, style, color=color, label=f"{name}, {label}"
            )
        pts = sorted(
            {(r["steps"], r["discretisation"]) for r in rows if r["sampler"] == name}
        )
        ax[1].loglog(*np.asarray(pts).T, "o-", color=color, label=name)
    N = np.asarray(cfg.steps)
    ax[0].loglog(N, N, "k--", lw=0.7, label="N (sequential)")
    ax[0].set(
        title=f"Picard sweeps to {cfg.error_target:g}",
        xlabel="steps N",
        ylabel="sweeps",
    )
    ax[1].set(
        title="distance to the converged ODE sample",
        xlabel="steps N",
        ylabel="RMS (pixels in [-1, 1])",
    )
    name, N = cfg.samplers[0], max(cfg.steps)
    dd.show(ax[2], images[(name, N)], f"{name}, N = {N}")
    for a in ax[:2]:
        a.legend(fontsize=6)
    workdir.savefig(fig, "picard_diffusion_trained.png")


def _table(rows, floor):
    headers = ["sampler", "N", "method", "sweeps", "N / sweeps", "evaluations"]
    headers += ["error", "RMS to ODE", "FD-digits", "sliced W2"]
    cells_ = lambda r: [
        r["sampler"],
        r["steps"],
        r["method"],
        r["sweeps"],
        f"{r['steps'] / r['sweeps']:.1f}",
        r["evaluations"],
        f"{r['error']:.1e}",
        f"{r['discretisation']:.4f}",
        f"{r['fd']:.2f} ({r['sequential_fd']:.2f})",
        f"{r['sw']:.3f} ({r['sequential_sw']:.3f})",
    ]
    note = (
        f"\n\nFloor (training digits against held-out): FD-digits "
        f"{floor['fd']:.2f}, sliced W2 {floor['sw']:.3f}. In brackets: sequential "
        "sampling's."
    )
    return markdown_table(headers, map(cells_, rows)) + note
