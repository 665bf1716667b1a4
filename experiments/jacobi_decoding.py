"""Jacobi decoding of a character-level transformer, before and after consistency
(CLLM) fine-tuning, and Speculative Jacobi Decoding on a known Markov chain.

1. Greedy: for every window size B, `iterjax.jacobi_decode` on validation
   prompts: model calls against the num_tokens of autoregressive decoding (the
   speedup in sequential model calls), and exact match with sequential greedy
   decoding (always 1 by construction; checked).
2. CLLM (Kou et al. 2024): Jacobi trajectories of the model on training prompts,
   then fine-tuning so that the model maps every state of a trajectory to its
   fixed point (cross-entropy of the predictions from the state against the fixed
   point's tokens, over the positions each call saw) plus the usual
   autoregressive loss on the text. The trajectories are re-collected with the
   current model at the start of each of `finetune.rounds` parts (CLLM collects
   once: rounds=1). Step 1 again, with the validation loss, and the share of
   tokens where the fine-tuned model's greedy output equals the original model's.
3. Sampling: SJD on the model (tokens per call at temperature `temperature`),
   and on a random second-order Markov chain with a known distribution: the total
   variation distance of SJD samples to the exact distribution, next to that of
   sequential samples of the same size.
"""

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

import iterjax as ij
from iterjax.experiments import charlm_train
from iterjax.experiments.common import charlm, checkpoints
from iterjax.lab.spec import Count, Fraction, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Finetune:
    prompts: Count = 256  # training prompts whose Jacobi trajectories are collected
    block_size: Count = 16  # window of the collected trajectories
    steps: Count = 3000
    batch: Count = 16
    lr: Positive = 2e-3
    ar_weight: float = 0.5  # weight of the autoregressive loss on real text
    rounds: Count = 3  # trajectories re-collected with the current model this often


@dataclasses.dataclass(frozen=True)
class Config:
    # A charlm_train checkpoint directory; "latest": the newest run under
    # runs/charlm_train; "": train one here with `model` and `train`.
    checkpoint: str = "latest"
    model: charlm.ModelConfig = charlm.ModelConfig()
    train: charlm.TrainConfig = charlm.TrainConfig()
    prompts: Count = 16  # validation prompts
    prompt_length: Count = 32
    num_tokens: Count = 64
    block_sizes: tuple[Count, ...] = (4, 8, 16, 32, 64)
    finetune: Finetune = Finetune()
    temperature: Positive = 0.8
    chain_samples: Count = 20_000
    seed: int = 0
    # The fine-tuned model's greedy outputs may give at most this share of their
    # tokens to one token; beyond it the run fails: its tokens per call would
    # measure a degenerate model ("the the the ..." decodes in few calls).
    max_top_token_share: Fraction = 0.5


def load_model(cfg, workdir):
    path = checkpoints.find(cfg.checkpoint, workdir, "charlm_train", "jacobi_decoding")
    if path is None:
        model, vocab, _, _ = charlm_train.train(cfg.model, cfg.train, workdir)
        return model, vocab, "trained here"
    model, vocab = charlm.load(path)
    return model, vocab, str(path)


def prompts_from(data, n, length, seed):
    start = np.random.default_rng(seed).integers(0, len(data) - length, n)
    return jnp.asarray(np.stack([data[s : s + length] for s in start]))


def decode_all(model, prompts, num_tokens, block_size, **kw):
    """`jacobi_decode` vmapped over prompts (one key each)."""
    graphdef, state = nnx.split(model)
    keys = jax.random.split(jax.random.key(0), prompts.shape[0])
    options = tuple(sorted(kw.items()))
    return _decode(graphdef, state, prompts, keys, num_tokens, block_size, options)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6))
def _decode(graphdef, state, prompts, keys, num_tokens, block_size, options):
    # The weights are an argument, so the model before and after fine-tuning
    # shares one compilation per window size.
    fn = lambda tokens: nnx.merge(graphdef, state)(tokens)
    decode = lambda p, k: ij.jacobi_decode(
        fn, p, num_tokens, block_size=block_size, key=k, **dict(options)
    )
    return jax.vmap(decode)(prompts, keys)


def measure(model, prompts, cfg):
    """Greedy Jacobi decoding for every window size: calls and exactness."""
    N = cfg.num_tokens
    reference, _ = decode_all(model, prompts, N, 1)  # sequential greedy
    rows = []
    for B in cfg.block_sizes:
        tokens, stats = decode_all(model, prompts, N, B)
        calls = np.asarray(stats.num_calls)
        rows.append(
            dict(
                block_size=B,
                calls=float(calls.mean()),
                tokens_per_call=float(np.mean(N / calls)),
                exact_match=float(np.mean(np.all(tokens == reference, axis=1))),
            )
        )
    return rows, np.asarray(reference)


def text_quality(tokens, n=4):
    """Measures that tokens per call cannot game, for outputs [prompts, N]: the
    share of distinct n-grams (distinct-n, 1 for text without repeats), and the
    largest share one token takes of an output (1 for "the the the ..." collapsed
    to one character; in English text the space, the most frequent character,
    is about a sixth), each averaged over the outputs, with the worst output's
    share."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 2 or tokens.shape[1] < n:
        raise ValueError(
            f"text_quality: need [outputs, >= {n} tokens], got {tokens.shape}"
        )
    grams = np.stack([tokens[:, i : tokens.shape[1] - n + 1 + i] for i in range(n)], -1)
    distinct = [len({tuple(g) for g in out}) / len(out) for out in grams]
    top = [np.bincount(out).max() / len(out) for out in tokens]
    return {
        f"distinct_{n}": float(np.mean(distinct)),
        "top_token_share": float(np.mean(top)),
        "worst_top_token_share": float(np.max(top)),
    }


def check_not_degenerate(tokens, max_share, vocab=None):
    """Raise if an output of [outputs, N] tokens gives more than `max_share` of
    its tokens to one token."""
    worst = text_quality(tokens)["worst_top_token_share"]
    if worst > max_share:
        i = int(np.argmax([np.bincount(t).max() for t in np.asarray(tokens)]))
        sample = vocab.decode(tokens[i]) if vocab else tokens[i]
        raise RuntimeError(
            f"jacobi_decoding: the fine-tuned model's greedy output is degenerate "
            f"(one token is {worst:.0%} of an output, over max_top_token_share="
            f"{max_share:g}): {sample!r}; its tokens per call would not measure "
            "decoding. Train the model longer, or fine-tune less."
        )


def collect(model, prompts, cfg):
    """Jacobi trajectories: (prompt, state, fixed point, positions seen)."""
    ft = cfg.finetune
    tokens, stats = decode_all(
        model, prompts, cfg.num_tokens, ft.block_size, return_trajectory=True
    )
    calls = np.asarray(stats.num_calls)
    accepted = np.cumsum(np.asarray(stats.accepted), axis=1)
    examples = []
    for i in range(prompts.shape[0]):
        for k in range(calls[i]):
            done = accepted[i, k - 1] if k else 0
            examples.append((i, k, done + ft.block_size))
    return np.asarray(tokens), np.asarray(stats.trajectory), examples


def finetune(model, cfg, train_data, prompts, workdir):
    """CLLM: consistency loss on trajectories + autoregressive loss on text.

    The trajectories and their fixed points are collected with the model being
    trained, afresh at the start of each of `rounds` equal parts of the steps
    (rounds=1 is CLLM's offline collection).
    """
    ft = cfg.finetune
    P, N = cfg.prompt_length, cfg.num_tokens
    tc = charlm.TrainConfig(
        steps=ft.steps, lr=ft.lr, warmup=min(50, ft.steps // 10 + 1), seed=cfg.seed
    )
    optimizer = charlm.make_optimizer(model, tc)
    rng = np.random.default_rng(cfg.seed + 5)
    text = charlm.batches(train_data, P + N, ft.batch, rng)
    history, num_examples, prompt_rows = [], 0, np.asarray(prompts)
    with workdir.progress(ft.steps, "consistency fine-tuning") as advance:
        for step in range(ft.steps):
            if step % -(-ft.steps // ft.rounds) == 0:
                fixed, trajectory, examples = collect(model, prompts, cfg)
                num_examples += len(examples)
            pick = [examples[j] for j in rng.integers(0, len(examples), ft.batch)]
            inputs = np.stack(
                [np.concatenate([prompt_rows[i], trajectory[i, k]]) for i, k, _ in pick]
            )
            targets = np.stack([fixed[i] for i, _, _ in pick])
            seen = np.stack([np.arange(N) < limit for _, _, limit in pick])
            x, y = next(text)
            loss = charlm.train_step(
                model,
                optimizer,
                np.concatenate([inputs, x]),
                np.concatenate([_shift_targets(targets, inputs, P), y]),
                np.concatenate(
                    [_positions(seen, P), np.full(y.shape, ft.ar_weight, np.float32)]
                ),
            )
            history.append(float(loss))
            workdir.log(kind="finetune", loss=float(loss))
            advance()
    return history, num_examples


def _shift_targets(fixed, inputs, P):
    """Targets for every input position: row P-1+j predicts fixed token j; the
    prompt rows (not trained) repeat the input."""
    out = inputs.copy()
    out[:, P - 1 : P - 1 + fixed.shape[1]] = fixed
    return out


def _positions(seen, P):
    w = np.zeros((seen.shape[0], P + seen.shape[1]), np.float32)
    w[:, P - 1 : P - 1 + seen.shape[1]] = seen
    return w


def chain_tv(cfg, block_size=4, vocab=3, length=4):
    """TV distance to the exact distribution: SJD vs sequential samples."""
    table = jax.random.normal(jax.random.key(cfg.seed + 9), (vocab,) * 3)
    logits_fn = lambda t: table[jnp.concatenate([t[:1], t[:-1]]), t]
    prompt = jnp.array([1, 0])
    logp = np.asarray(jax.nn.log_softmax(table / cfg.temperature, axis=-1))
    exact = {}
    for seq in itertools.product(range(vocab), repeat=length):
        full = [1, 0, *seq]
        exact[seq] = np.exp(
            sum(
                logp[full[i - 1], full[i], full[i + 1]] for i in range(1, len(full) - 1)
            )
        )
    keys = jax.random.split(jax.random.key(cfg.seed + 10), cfg.chain_samples)
    out = {}
    for name, B in [("sequential", 1), ("sjd", block_size)]:
        sample = jax.jit(
            jax.vmap(
                lambda k, B=B: ij.jacobi_decode(
                    logits_fn,
                    prompt,
                    length,
                    block_size=B,
                    temperature=cfg.temperature,
                    key=k,
                )
            )
        )
        tokens, stats = sample(keys)
        counts = {}
        for row in map(tuple, np.asarray(tokens).tolist()):
            counts[row] = counts.get(row, 0) + 1
        tv = 0.5 * sum(
            abs(counts.get(s, 0) / cfg.chain_samples - p) for s, p in exact.items()
        )
        out[name] = dict(tv=tv, calls=float(np.mean(stats.num_calls)))
    return out


def run(cfg: Config, workdir) -> dict:
    model, vocab, source = load_model(cfg, workdir)
    if model.cfg.context < cfg.prompt_length + cfg.num_tokens:
        raise ValueError(
            f"jacobi_decoding: prompt_length + num_tokens must fit the model's "
            f"context ({model.cfg.context})"
        )
    text = charlm.load_text(cfg.train.max_chars)
    train_data, val_data = charlm.split(text, vocab)
    val_prompts = prompts_from(val_data, cfg.prompts, cfg.prompt_length, cfg.seed)
    val_cfg = dataclasses.replace(cfg.train, batch=16)
    ctx = model.cfg.context

    before, greedy_before = measure(model, val_prompts, cfg)
    loss_before = charlm.validation_loss(model, val_data, val_cfg, ctx)
    for r in before:
        workdir.log(stage="before", **r)
    train_prompts = prompts_from(
        train_data, cfg.finetune.prompts, cfg.prompt_length, cfg.seed + 1
    )
    history, num_examples = finetune(model, cfg, train_data, train_prompts, workdir)
    after, greedy_after = measure(model, val_prompts, cfg)
    check_not_degenerate(greedy_after, cfg.max_top_token_share, vocab)
    loss_after = charlm.validation_loss(model, val_data, val_cfg, ctx)
    for r in after:
        workdir.log(stage="after", **r)

    sampling = []
    for B in cfg.block_sizes:
        sampled, stats = decode_all(
            model, val_prompts, cfg.num_tokens, B, temperature=cfg.temperature
        )
        calls = np.asarray(stats.num_calls)
        sampling.append(
            dict(
                block_size=B,
                tokens_per_call=float(np.mean(cfg.num_tokens / calls)),
                **text_quality(sampled),
            )
        )
    chain = chain_tv(cfg)
    workdir.log(kind="sampling", rows=sampling, chain=chain)
    summary = dict(
        model=source,
        before=before,
        after=after,
        val_loss_before=loss_before,
        val_loss_after=loss_after,
        greedy_unchanged=float(np.mean(greedy_before == greedy_after)),
        # greedy Jacobi decoding is exact: its text is sequential greedy's
        greedy_quality_before=text_quality(greedy_before),
        greedy_quality_after=text_quality(greedy_after),
        finetune_examples=num_examples,
        best_speedup_after=max(r["tokens_per_call"] for r in after),
        sampling=sampling,
        chain=chain,
        sample_before=vocab.decode(greedy_before[0]),
        sample_after=vocab.decode(greedy_after[0]),
    )
    _plot(cfg, summary, history, workdir)
    summary["table"] = _table(summary)
    return summary


def _plot(cfg, s, history, workdir):
    fig, ax = plt.subplots(1, 3, figsize=(16, 4.5))
    B = [r["block_size"] for r in s["before"]]
    for key, label in [("before", "greedy, trained"), ("after", "greedy, + CLLM")]:
        ax[0].plot(B, [r["tokens_per_call"] for r in s[key]], "o-", label=label)
    ax[0].plot(
        B,
        [r["tokens_per_call"] for r in s["sampling"]],
        "s--",
        label=f"SJD, T={cfg.temperature:g} (+ CLLM)",
    )
    ax[0].axhline(1, color="k", lw=0.5, label="autoregressive")
    ax[0].axhline(2, color="k", lw=0.5, ls=":", label="2x target")
    ax[0].set(
        xscale="log",
        xlabel="window (block) size",
        ylabel="tokens per model call",
        title="Jacobi decoding: speedup in sequential model calls",
    )
    ax[0].minorticks_off()
    ax[0].set_xticks(B, [str(b) for b in B])
    ax[1].plot(history, lw=0.5)
    ax[1].set(xlabel="step", ylabel="loss", title="consistency + AR fine-tuning loss")
    names = list(s["chain"])
    ax[2].bar(names, [s["chain"][n]["tv"] for n in names])
    ax[2].set(
        ylabel="total variation to the exact distribution",
        title=f"Markov chain, {cfg.chain_samples} samples each",
    )
    for a in ax[:1]:
        a.legend(fontsize=8)
    workdir.savefig(fig, "jacobi_decoding.png")


def _table(s):
    headers = ["window", "tokens/call (trained)", "tokens/call (+ CLLM)"]
    rows = [
        [
            b["block_size"],
            f"{b['tokens_per_call']:.2f}",
            f"{a['tokens_per_call']:.2f}",
            min(b["exact_match"], a["exact_match"]),
        ]
        for b, a in zip(s["before"], s["after"])
    ]
    return markdown_table(headers + ["exact match"], rows)
