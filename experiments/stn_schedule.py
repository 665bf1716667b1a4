r"""A Self-Tuning Network learns a weight-decay and dropout schedule on digits.

An MLP 64 -> `hidden` -> 10 of `iterjax.bilevel.stn.STNLinear` layers trains on
`train_size` digits. Two hyperparameters: the log weight decay λ (continuous)
and dropout of the hidden units at rate `dropout_rate`, on or off (discrete,
on with probability π = σ(α)). Their features h = (λ - λ₀, on) gate the hidden
and output units. Each round:

* `fit_steps` Adam steps on the training loss (minibatches of `batch`) at
  λ ~ N(λ̂, σ²) and on ~ Bernoulli(π), with the sampled dropout applied: the
  layers learn their response to the hyperparameters around the current ones;
* one Adam step on (λ̂, α) on the validation loss through that response:
  ∂/∂λ̂ by autodiff, and for α the exact expectation over on / off,
  ∂/∂α [π L(on) + (1 - π) L(off)].

Recorded per round: λ̂, π and the validation loss: the schedule. Compared at the
end: the test accuracy of the STN at its final hyperparameters against the
same network trained the same number of steps at the initial, fixed ones.
"""

import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import optax
from flax import nnx
from sklearn.datasets import load_digits

from iterjax.bilevel.stn import STNLinear
from iterjax.internal import optax_init, optax_step
from iterjax.lab.spec import Count, Fraction, Positive
from iterjax.lab.tables import markdown_table


@dataclasses.dataclass(frozen=True)
class Config:
    train_size: Count = 200
    val_size: Count = 300
    hidden: Count = 128
    dropout_rate: Fraction = 0.5
    log_decay0: float = -8.0  # λ₀, the initial log weight decay
    dropout_logit0: float = 0.0  # α₀: π = 1/2 at the start
    sigma: Positive = 0.5  # the spread of λ in the local fits
    rounds: Count = 300
    fit_steps: Count = 10
    batch: Count = 32
    lr: Positive = 3e-3  # the weights' Adam
    hyper_lr: Positive = 3e-2  # the hyperparameters' Adam
    seed: int = 0
    x64: bool = False


class STNMLP(nnx.Module):
    def __init__(self, hidden, rngs):
        self.hidden = STNLinear(64, hidden, 2, rngs=rngs)
        self.out = STNLinear(hidden, 10, 2, rngs=rngs)

    def __call__(self, x, h, mask=None):
        z = jax.nn.relu(self.hidden(x, h))
        if mask is not None:
            z = z * mask
        return self.out(z, h)


def data(cfg):
    x, y = load_digits(return_X_y=True)
    idx = jax.random.permutation(jax.random.PRNGKey(cfg.seed), len(x))
    x, y = jnp.asarray(x / 16.0, jnp.float32)[idx], jnp.asarray(y)[idx]
    a, b = cfg.train_size, cfg.train_size + cfg.val_size
    return (x[:a], y[:a]), (x[a:b], y[a:b]), (x[b:], y[b:])


def cross_entropy(logits, y):
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], 1))


def run(cfg: Config, workdir) -> dict:
    train, val, test = data(cfg)
    graph, params = nnx.split(STNMLP(cfg.hidden, nnx.Rngs(cfg.seed)))
    features = lambda lam, on: jnp.stack([lam - cfg.log_decay0, on])

    def train_loss(params, lam, on, x, y, key):
        model = nnx.merge(graph, params)
        keep = jax.random.bernoulli(key, 1 - cfg.dropout_rate, (len(x), cfg.hidden))
        keep = keep.astype(x.dtype) / (1 - cfg.dropout_rate)
        mask = jnp.where(on > 0.5, keep, jnp.ones_like(keep))
        decay = jnp.exp(lam) * sum(
            jnp.sum(layer.elem[...] ** 2) for layer in (model.hidden, model.out)
        )
        return cross_entropy(model(x, features(lam, on), mask), y) + decay

    def val_loss(params, lam, on):
        model = nnx.merge(graph, params)
        return cross_entropy(model(val[0], features(lam, on)), val[1])

    opt, hyper_opt = optax.adam(cfg.lr), optax.adam(cfg.hyper_lr)

    def fit(state, key):
        params, opt_state, (lam_hat, alpha) = state
        k_lam, k_on, k_batch, k_mask = jax.random.split(key, 4)
        lam = lam_hat + cfg.sigma * jax.random.normal(k_lam)
        on = jax.random.bernoulli(k_on, jax.nn.sigmoid(alpha)).astype(lam.dtype)
        idx = jax.random.randint(k_batch, (cfg.batch,), 0, cfg.train_size)
        grad = jax.grad(train_loss)(params, lam, on, *(a[idx] for a in train), k_mask)
        params, opt_state = optax_step(opt, grad, opt_state, params)
        return (params, opt_state, (lam_hat, alpha)), None

    def hyper_objective(hyper, params):
        lam_hat, alpha = hyper
        pi = jax.nn.sigmoid(alpha)
        on, off = val_loss(params, lam_hat, 1.0), val_loss(params, lam_hat, 0.0)
        return pi * on + (1 - pi) * off

    def round_(state, key, tune):
        """`fit_steps` local-fit steps, then (if `tune`) one hyperparameter step."""
        params, opt_state, hyper, hyper_state = state
        keys = jax.random.split(key, cfg.fit_steps)
        (params, opt_state, hyper), _ = jax.lax.scan(
            fit, (params, opt_state, hyper), keys
        )
        if not tune:  # the fixed-hyperparameter baseline
            return (params, opt_state, hyper, hyper_state), None
        loss, grad = jax.value_and_grad(hyper_objective)(hyper, params)
        hyper, hyper_state = optax_step(hyper_opt, grad, hyper_state, hyper)
        return (params, opt_state, hyper, hyper_state), (hyper, loss)

    def train_run(tune: bool, key):
        hyper = (jnp.float32(cfg.log_decay0), jnp.float32(cfg.dropout_logit0))
        state = (params, optax_init(opt, params), hyper, optax_init(hyper_opt, hyper))
        keys = jax.random.split(key, cfg.rounds)
        return jax.lax.scan(lambda s, k: round_(s, k, tune), state, keys)

    key = jax.random.PRNGKey(cfg.seed)
    (p_stn, _, hyper, _), (schedule, losses) = jax.jit(lambda k: train_run(True, k))(
        key
    )
    (p_fix, _, hyper0, _), _ = jax.jit(lambda k: train_run(False, k))(key)

    def accuracy(params, hyper):
        lam, alpha = hyper
        on = (jax.nn.sigmoid(alpha) > 0.5).astype(jnp.float32)
        logits = nnx.merge(graph, params)(test[0], features(lam, on))
        return float(jnp.mean(jnp.argmax(logits, -1) == test[1]))

    lams, alphas = schedule
    for r in range(cfg.rounds):
        workdir.log(
            round=r,
            log_decay=float(lams[r]),
            dropout_prob=float(jax.nn.sigmoid(alphas[r])),
            val_loss=float(losses[r]),
        )
    _plot(lams, jax.nn.sigmoid(alphas), losses, workdir)
    rows = [
        dict(model="STN (tuned schedule)", test_acc=accuracy(p_stn, hyper)),
        dict(model="fixed initial hyperparameters", test_acc=accuracy(p_fix, hyper0)),
    ]
    return dict(
        rows=rows,
        final_log_decay=float(lams[-1]),
        final_dropout_prob=float(jax.nn.sigmoid(alphas[-1])),
        first_val_loss=float(losses[0]),
        last_val_loss=float(losses[-1]),
        table=markdown_table(
            ["model", "test accuracy"],
            [[r["model"], f"{100 * r['test_acc']:.1f}%"] for r in rows],
        ),
    )


def _plot(lams, pis, losses, workdir):
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(lams)
    axes[0].set(xlabel="round", ylabel="log weight decay λ̂")
    axes[1].plot(pis)
    axes[1].set(xlabel="round", ylabel="P(dropout on)", ylim=(0, 1))
    axes[2].plot(losses)
    axes[2].set(xlabel="round", ylabel="validation loss (expected over dropout)")
    workdir.savefig(fig, "stn_schedule.png")
