"""DEQ and explicit classifiers on small image/signal sets, shared by deq_* experiments.

Data (`TrainConfig.dataset`), offline:

* "digits": the 1797 8x8 digit images bundled with scikit-learn, pixels scaled
  to [0, 1], a stratified train/test split (`test_fraction`).
* "mnist1d": MNIST-1D (Greydanus 2020), 5000 1-D signals of 40 samples, 10
  classes, generated offline by the `mnist1d` package with its default
  arguments (it only downloads in `get_dataset`, which is not used) and its own
  4000/1000 split; harder than the digits for a small model (an MLP reaches
  ~70%, a CNN ~95% in its paper).

Models:

* `DEQClassifier`: z* = cell(z*, x) per example (an `iterjax.deq.DEQ` under
  `nnx.vmap`), logits = head(z*). The cell is `ContractiveDense` (a contraction
  for every weight value), `SubhomogeneousDense` (a contraction in Thompson's
  metric for every weight value) or `DenseCell` (unconstrained:
  tanh(W z + U x + b)).
* `MLP`: 64 -> m -> m -> 10 with tanh, m chosen so the parameter count matches.

`Variant` is one model of a comparison (cell, solver, adjoint, stabilisers);
`train` runs one variant and returns its per-epoch history.
"""

import dataclasses
import functools
import random
import time
from typing import Annotated, Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from mnist1d.data import get_dataset_args, make_dataset
from sklearn.datasets import load_digits as sk_load
from sklearn.model_selection import train_test_split

import iterjax as ij
from iterjax.lab.config import Spec
from iterjax.lab.registry import build
from iterjax.lab.spec import Count, Fraction, NonNegative, Positive

CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Variant:
    label: str
    kind: Literal["deq", "mlp"] = "deq"
    cell: Literal["contractive", "subhomogeneous", "dense"] = "contractive"
    gamma: float = 0.9  # the contraction factor of the contractive cell
    mu: float = 0.5  # the subhomogeneity coefficient of the subhomogeneous cell
    solver: Annotated[Spec, "solver"] = Spec("anderson")
    adjoint: Annotated[Spec, "adjoint"] = Spec("implicit")
    jac_reg: NonNegative = 0.0  # weight of the Jacobian penalty / dim(z)
    correction: int = 0  # fixed-point correction states (0: off)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    hidden: Count = 64
    epochs: Count = 30
    batch: Count = 64
    lr: Positive = 3e-3
    weight_decay: NonNegative = 1e-4
    atol: Positive = 1e-4
    rtol: NonNegative = 0.0
    max_steps: Count = 30
    test_fraction: Fraction = 0.2  # digits only (MNIST-1D has its own split)
    seed: int = 0
    dataset: Literal["digits", "mnist1d"] = "digits"


def load_data(cfg: TrainConfig):
    """(x_train, y_train, x_test, y_test) of `cfg.dataset`."""
    if cfg.dataset == "mnist1d":
        return load_mnist1d()
    return load_digits(cfg.test_fraction, cfg.seed)


@functools.lru_cache
def load_mnist1d():
    """MNIST-1D with the package's default arguments: (4000, 40) train, (1000, 40)
    test, float32 / int32."""
    state, py_state = np.random.get_state(), random.getstate()
    try:  # make_dataset seeds numpy's and Python's global generators
        d = make_dataset(get_dataset_args())
    finally:
        np.random.set_state(state)
        random.setstate(py_state)
    x, xt = (d[k].astype(np.float32) for k in ("x", "x_test"))
    return x, d["y"].astype(np.int32), xt, d["y_test"].astype(np.int32)


@functools.lru_cache
def load_digits(test_fraction: float = 0.2, seed: int = 0):
    """(x_train, y_train, x_test, y_test) as float32 / int32 numpy arrays."""

    data = sk_load()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    xtr, xte, ytr, yte = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed
    )
    return xtr, ytr, xte, yte


class DenseCell(nnx.Module):
    """z -> tanh(W z + U x + b), unconstrained (no existence guarantee).

    W starts with spectral radius ~`scale` (the usual DEQ practice of a small
    initial Jacobian); training may push it anywhere.
    """

    def __init__(self, in_features, features, *, scale=0.5, param_dtype, rngs):
        init = jax.nn.initializers.variance_scaling(scale**2, "fan_in", "normal")
        dense = functools.partial(nnx.Linear, param_dtype=param_dtype, rngs=rngs)
        self.w = dense(features, features, use_bias=False, kernel_init=init)
        self.u = dense(in_features, features)

    def __call__(self, z, x):
        return jnp.tanh(self.w(z) + self.u(x))


class DEQClassifier(nnx.Module):
    def __init__(self, cell, head, *, hidden, **deq_options):
        self.deq = ij.deq.DEQ(cell, **deq_options)
        self.head = head
        self.hidden = hidden

    def solve(self, x):
        """Per-example fixed points z* (B, hidden) and their `Solution`s."""
        z0 = jnp.zeros((self.hidden,), x.dtype)
        return nnx.vmap(lambda x: self.deq(x, z0, return_solution=True))(x)

    def __call__(self, x):
        return self.head(self.solve(x)[0])


class MLP(nnx.Module):
    def __init__(self, in_features, width, *, param_dtype, rngs):
        dense = functools.partial(nnx.Linear, param_dtype=param_dtype, rngs=rngs)
        self.l1 = dense(in_features, width)
        self.l2 = dense(width, width)
        self.head = dense(width, CLASSES)

    def __call__(self, x):
        return self.head(jnp.tanh(self.l2(jnp.tanh(self.l1(x)))))


def num_params(model) -> int:
    return sum(int(p.size) for p in jax.tree.leaves(nnx.state(model, nnx.Param)))


def deq_params(hidden, in_features=64):
    """Parameters of a DEQClassifier: W (h x h), U and b, head."""
    return hidden * hidden + (in_features + 1) * hidden + (hidden + 1) * CLASSES


def mlp_width(target, in_features=64):
    """The MLP width whose parameter count is nearest `target`."""
    count = lambda m: (in_features + 1) * m + (m + 1) * m + (m + 1) * CLASSES
    return min(range(1, 4 * target), key=lambda m: abs(count(m) - target))


def make_model(v: Variant, cfg: TrainConfig, in_features=64, dtype=jnp.float32):
    """The variant's model, its parameters of `dtype`, seeded by `cfg.seed`."""
    kw = dict(param_dtype=dtype, rngs=nnx.Rngs(cfg.seed))
    h = cfg.hidden
    if v.kind == "mlp":
        return MLP(in_features, mlp_width(deq_params(h, in_features)), **kw)
    cell: nnx.Module
    if v.cell == "contractive":
        cell = ij.deq.ContractiveDense(in_features, h, gamma=v.gamma, **kw)
    elif v.cell == "subhomogeneous":
        cell = ij.deq.SubhomogeneousDense(in_features, h, mu=v.mu, **kw)
    else:
        cell = DenseCell(in_features, h, **kw)
    return DEQClassifier(
        cell,
        nnx.Linear(h, CLASSES, **kw),
        hidden=h,
        solver=build("solver", v.solver),
        adjoint=build("adjoint", v.adjoint),
        atol=cfg.atol,
        rtol=cfg.rtol,
        max_steps=cfg.max_steps,
    )


def cross_entropy(logits, y):
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))


def loss_and_stats(model, x, y, key, jac_reg=0.0, correction=0):
    """Training loss of one batch, and solver statistics for the record."""
    if isinstance(model, MLP):
        return cross_entropy(model(x), y), {}
    z, sol = model.solve(x)
    if correction:
        # Σ γ^{k-i} CE(z_i) over the phantom states z_1..z_k, γ = 0.8 (DEQ-Flow).
        zs = model.deq.fixed_point_correction(x, z, steps=correction)
        weights = 0.8 ** jnp.arange(correction - 1, -1, -1, dtype=x.dtype)
        losses = jax.vmap(lambda z: cross_entropy(model.head(z), y))(zs)
        loss = jnp.sum(weights * losses) / jnp.sum(weights)
    else:
        loss = cross_entropy(model.head(z), y)
    stats = dict(
        steps=jnp.mean(sol.num_steps.astype(x.dtype)),
        max_steps=jnp.max(sol.num_steps),
        converged=jnp.mean(sol.converged.astype(x.dtype)),
        residual=jnp.max(sol.residual),
    )
    if jac_reg:
        zs = jax.lax.stop_gradient(z)
        penalty = model.deq.jacobian_penalty(x, zs, key) / zs.size
        loss = loss + jac_reg * penalty
        stats["jac_penalty"] = penalty
    return loss, stats


def optimizer(model, cfg: TrainConfig, total_steps: int):
    """AdamW on a cosine schedule that skips a step whose gradient is not finite
    (`optax.apply_if_finite`): the implicit gradient is NaN, by design, where the
    backward solve fails (an unconstrained cell near I - J singular); the skipped
    steps are counted (`skipped` in the rows); 20 in a row stop training."""
    schedule = optax.cosine_decay_schedule(cfg.lr, total_steps)
    tx = optax.adamw(schedule, weight_decay=cfg.weight_decay)
    tx = optax.apply_if_finite(tx, max_consecutive_errors=20)
    return nnx.Optimizer(model, tx, wrt=nnx.Param)


@functools.partial(nnx.jit, static_argnames=("jac_reg", "correction"))
def train_step(model, opt, x, y, key, jac_reg=0.0, correction=0):
    grad_fn = nnx.value_and_grad(loss_and_stats, has_aux=True)
    with jax.numpy_dtype_promotion("standard"):  # optax mixes int and float
        (loss, stats), grads = grad_fn(model, x, y, key, jac_reg, correction)
        opt.update(model, grads)
    return loss, stats


@nnx.jit
def evaluate(model, x, y):
    """Test accuracy, and mean forward solver steps for a DEQ (0 for an MLP)."""
    if isinstance(model, MLP):
        return jnp.mean(jnp.argmax(model(x), -1).astype(y.dtype) == y), jnp.zeros(
            (), x.dtype
        )
    z, sol = model.solve(x)
    acc = jnp.mean(jnp.argmax(model.head(z), -1).astype(y.dtype) == y)
    return acc, jnp.mean(sol.num_steps.astype(x.dtype))


def train(
    v: Variant,
    cfg: TrainConfig,
    log=lambda **row: None,
    advance=None,
    shard=lambda batch: batch,
):
    """Train one variant; returns (model, history: list of per-epoch dicts).

    `shard` places each batch (e.g. `Workdir.shard`: over the config's mesh, for
    data parallelism; the parameters follow, replicated).

    Stops early (the last row's train_loss is not finite) if training diverges.
    """
    xtr, ytr, xte, yte = load_data(cfg)
    model = make_model(v, cfg, xtr.shape[1])
    per_epoch = len(xtr) // cfg.batch
    opt = optimizer(model, cfg, cfg.epochs * per_epoch)
    rng = np.random.default_rng(cfg.seed)
    key = jax.random.key(cfg.seed)
    history = []
    for epoch in range(cfg.epochs):
        order = rng.permutation(len(xtr))
        stats: list[dict] = []
        losses, start = [], time.perf_counter()
        for b in range(per_epoch):
            idx = order[b * cfg.batch : (b + 1) * cfg.batch]
            key, sub = jax.random.split(key)
            x, y = shard((xtr[idx], ytr[idx]))
            out: Any = train_step(  # type: ignore[call-arg]  # nnx.jit's stub
                model, opt, x, y, sub, v.jac_reg, v.correction
            )
            loss, s = out
            losses.append(loss)
            stats.append(s)
        jax.block_until_ready(losses)
        seconds = time.perf_counter() - start
        acc, test_steps = evaluate(model, xte, yte)
        row = dict(
            model=v.label,
            epoch=epoch + 1,
            train_loss=float(np.mean(losses)),
            test_acc=float(acc),
            test_steps=float(test_steps),
            ms_per_step=1e3 * seconds / per_epoch,
        )
        for k in stats[0] if stats else ():
            row["train_" + k] = float(np.mean([s[k] for s in stats]))
        row["skipped"] = int(opt.opt_state.total_notfinite[...])
        log(**row)
        history.append(row)
        if advance:
            advance()
        if not np.isfinite(float(np.mean(losses))):
            log(model=v.label, epoch=epoch + 1, diverged=True)
            break  # a blown-up model is recorded as such, not trained further
    return model, history
