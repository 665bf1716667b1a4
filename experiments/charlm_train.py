"""Train the tiny character-level transformer of `experiments.charlm` on
Shakespeare, checkpoint it (`checkpoint/` in the run directory, loaded by the
`jacobi_decoding` experiment), plot the loss, and show a greedy continuation
decoded with `iterjax.jacobi_decode`.
"""

import dataclasses

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import iterjax as ij
from iterjax.experiments.common import charlm
from iterjax.lab.spec import Count


@dataclasses.dataclass(frozen=True)
class Config:
    model: charlm.ModelConfig = charlm.ModelConfig()
    train: charlm.TrainConfig = charlm.TrainConfig()
    prompt: str = "ROMEO:\nBut soft, what light"
    sample_tokens: Count = 64


def train(cfg_model, cfg_train, workdir, progress_label="training"):
    """Train a CharLM; log and return (model, vocab, val data, history).

    Resumable: the model and optimiser are checkpointed through the workdir
    (`checkpoint_every: N` in the config, `iterjax run --resume DIR`), and the
    batch of step k depends only on (seed, k).
    """
    text = charlm.load_text(cfg_train.max_chars)
    vocab = charlm.Vocab.of(charlm.load_text())  # the same vocabulary always
    train_data, val_data = charlm.split(text, vocab)
    model = charlm.CharLM(len(vocab), cfg_model, nnx.Rngs(cfg_train.seed))
    optimizer = charlm.make_optimizer(model, cfg_train)
    state = nnx.state((model, optimizer))
    start, saved = workdir.restore(nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, saved)
    nnx.update((model, optimizer), state)
    history = workdir.logged()[:start]  # the rows before a resumed checkpoint
    with workdir.progress(cfg_train.steps, progress_label) as advance:
        advance(start)
        for step in range(start + 1, cfg_train.steps + 1):
            rng = np.random.default_rng([cfg_train.seed, step])
            batch = next(
                charlm.batches(train_data, cfg_model.context, cfg_train.batch, rng)
            )
            loss = float(charlm.train_step(model, optimizer, *batch, None))
            row = dict(step=step, train_loss=loss)
            if step % cfg_train.eval_every == 0 or step == cfg_train.steps:
                row["val_loss"] = charlm.validation_loss(
                    model, val_data, cfg_train, cfg_model.context
                )
            workdir.log("train", **row)
            history.append(row)
            workdir.checkpoint(step, nnx.to_pure_dict(nnx.state((model, optimizer))))
            advance()
    return model, vocab, val_data, history


def run(cfg: Config, workdir) -> dict:
    model, vocab, _, history = train(cfg.model, cfg.train, workdir)
    charlm.save(model, vocab, workdir.path / "checkpoint")
    prompt = jnp.asarray(vocab.encode(cfg.prompt))
    n = min(cfg.sample_tokens, cfg.model.context - len(prompt))
    fn = charlm.logits_fn(model)
    tokens, stats = ij.jacobi_decode(fn, prompt, n, block_size=16)
    sequential, _ = ij.jacobi_decode(fn, prompt, n, block_size=1)
    _plot(history, workdir)
    val = [r["val_loss"] for r in history if "val_loss" in r]
    return dict(
        final_train_loss=float(np.mean([r["train_loss"] for r in history[-50:]])),
        final_val_loss=val[-1],
        sample=cfg.prompt + vocab.decode(tokens),
        sample_calls=int(stats.num_calls),
        sample_tokens=n,
        sample_equals_sequential=bool(jnp.all(tokens == sequential)),
        checkpoint=str(workdir.path / "checkpoint"),
    )


def _plot(history, workdir):
    fig, ax = plt.subplots(figsize=(6, 4))
    steps = [r["step"] for r in history]
    ax.plot(steps, [r["train_loss"] for r in history], lw=0.5, label="train")
    val = [(r["step"], r["val_loss"]) for r in history if "val_loss" in r]
    ax.plot(*zip(*val), "o-", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="charlm")
    ax.legend()
    workdir.savefig(fig, "loss.png")
