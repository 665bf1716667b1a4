"""A tiny experiment for the platform tests: noisy gradient descent on a quadratic.

`run` is a resumable training loop (checkpoints through the workdir); `trial`
computes the same final metrics (and the rows `run` logs) as one pure function,
so sweeps over `seed` and `lr` vectorise. `fail_seed` / `nan_seed` make chosen
members crash or report NaN.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int = 6
    dim: int = 3
    lr: float = 0.1
    seed: int = 0
    fail_seed: int = -1
    nan_seed: int = -1


ARRAY_KEYS = ("seed", "lr")


def _init(cfg):
    return {
        "w": jnp.ones(cfg.dim),
        "key": jax.random.key_data(jax.random.key(cfg.seed)),
    }


@jax.jit
def _update(state, lr):
    key, sub = jax.random.split(jax.random.wrap_key_data(state["key"]))
    noise = 0.1 * jax.random.normal(sub, state["w"].shape)
    w = state["w"] - lr * (state["w"] + noise)  # the gradient of |w|^2 / 2, noisy
    return {"w": w, "key": jax.random.key_data(key)}


def _loss(state):
    return 0.5 * jnp.sum(state["w"] ** 2)


def _metrics(cfg, state):
    loss = jnp.where(cfg.seed == cfg.nan_seed, jnp.nan, _loss(state))
    return {"loss": loss, "w0": state["w"][0]}


def trial(cfg):
    """The final metrics, and under `rows` the per-step losses that `run` logs."""

    def step(state, _):
        state = _update(state, cfg.lr)
        return state, _loss(state)

    state, losses = jax.lax.scan(step, _init(cfg), length=cfg.steps)
    rows = {"step": jnp.arange(1, cfg.steps + 1, dtype=jnp.int32), "loss": losses}
    return {**_metrics(cfg, state), "rows": rows}


def run(cfg, workdir):
    if cfg.seed == cfg.fail_seed:
        raise RuntimeError(f"toy failure for seed {cfg.seed}")
    start, state = workdir.restore(_init(cfg))
    print(f"toy: lr {cfg.lr}, from step {start}")
    with workdir.progress(cfg.steps - start, "training") as advance:
        for step in range(start + 1, cfg.steps + 1):
            state = _update(state, cfg.lr)
            workdir.log("train", step=step, loss=float(_loss(state)))
            workdir.checkpoint(step, state)
            advance()
    fig, ax = plt.subplots()
    ax.plot([r["loss"] for r in workdir.logged()])
    workdir.savefig(fig, "loss.png")
    return {"metrics": jax.tree.map(float, _metrics(cfg, state))}
